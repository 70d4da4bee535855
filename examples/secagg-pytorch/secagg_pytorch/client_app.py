"""The ClientApp: a NumPyClient behind Flower's secaggplus_mod, so the server sees only the masked sum."""
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context

from secagg_pytorch.task import Net, get_weights, load_data, set_weights, train


class CifarClient(NumPyClient):
    def __init__(self, loader, epochs: int, lr: float):
        self.loader, self.epochs, self.lr = loader, epochs, lr

    def fit(self, parameters, config):
        net = Net()
        set_weights(net, parameters)
        loss = train(net, self.loader, self.epochs, float(config.get("lr", self.lr)))
        return get_weights(net), len(self.loader.dataset), {"train_loss": loss}


def client_fn(context: Context):
    loader = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                       int(context.run_config["batch-size"]), str(context.run_config["data-path"]),
                       int(context.run_config["max-train-examples"]))
    return CifarClient(loader, int(context.run_config["local-epochs"]), float(context.run_config["lr"])).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
