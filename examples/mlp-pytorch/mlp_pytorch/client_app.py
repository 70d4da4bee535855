"""The ClientApp: each SuperNode trains the global model on its own partition and evaluates it."""
from typing import cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mlp_pytorch.task import Net, load_data
from mlp_pytorch.task import test as test_model
from mlp_pytorch.task import train as train_model

app = ClientApp()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def client_data(context: Context):
    """This node's training and test loaders, from its node config (partition) and the run config."""
    return load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                     int(context.run_config["batch-size"]), str(context.run_config["data-path"]),
                     int(context.run_config["max-train-examples"]))


def received_model(msg: Message) -> Net:
    """The global model the server sent, loaded into this app's own Net (strictly: every key, every shape)."""
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Trains the received model on this node's training images and sends it back with its loss."""
    model = received_model(msg)
    train_loader, _ = client_data(context)
    loss = train_model(model, train_loader, int(context.run_config["local-epochs"]),
                       cast(float, msg.content.config_records["config"]["lr"]), device)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(train_loader.dataset)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Scores the received model on this node's test images."""
    model = received_model(msg)
    _, test_loader = client_data(context)
    loss, accuracy = test_model(model, test_loader, device)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(test_loader.dataset)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
