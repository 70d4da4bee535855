"""The ServerApp: FedAvg on Flower's legacy path, each round's fit through SecAggPlusWorkflow."""
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

import fl_sim
from secagg_pytorch.task import MEAN, STD, Net, get_weights

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    lr = float(config["lr"])
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_available_clients=int(config["min-clients"]),
                      initial_parameters=ndarrays_to_parameters(get_weights(Net())),
                      on_fit_config_fn=lambda server_round: {"lr": lr})
    strategy = fl_sim.malicious(strategy, model=Net(), context=context, reference=config["data-path"] or None,
                                normalize=(MEAN, STD), momentum=0.9)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(config["num-server-rounds"])),
                           strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=int(config["num-shares"]), reconstruction_threshold=int(config["reconstruction-threshold"]),
        max_weight=float(config["max-weight"])))
    workflow(grid, legacy)
