"""The ServerApp: FedAvg over the SuperNodes, starting from a fresh MLP."""
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mlp_pytorch.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs `num-server-rounds` rounds of FedAvg, each training on a `fraction-train` share of the nodes."""
    num_rounds = int(context.run_config["num-server-rounds"])
    lr = float(context.run_config["lr"])

    strategy = FedAvg(fraction_train=float(context.run_config["fraction-train"]))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            train_config=ConfigRecord({"lr": lr}), num_rounds=num_rounds)
    print(f"Trained {num_rounds} rounds; last evaluation: {result.evaluate_metrics_clientapp.get(num_rounds)}")
