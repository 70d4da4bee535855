"""The ServerApp: FedAvg over the SuperNodes, starting from a fresh Net."""
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fl_sim
from quickstart_pytorch.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs `num-server-rounds` rounds of FedAvg, each training on a `fraction-train` share of the nodes."""
    num_rounds = int(context.run_config["num-server-rounds"])
    fraction_train = float(context.run_config["fraction-train"])
    lr = float(context.run_config["lr"])
    initial_arrays = ArrayRecord(Net().state_dict())

    strategy = fl_sim.malicious(FedAvg(fraction_train=fraction_train), model=Net(), context=context,
                                reference=context.run_config["data-path"] or None,
                                normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), momentum=0.9)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays, train_config=ConfigRecord({"lr": lr}),
                            num_rounds=num_rounds)
    print(f"Trained {num_rounds} rounds; last evaluation: {result.evaluate_metrics_clientapp.get(num_rounds)}")
