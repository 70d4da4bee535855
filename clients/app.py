"""The Flower ClientApp: an honest client per partition of the training set.

Each round a client takes the global weights and the training settings the server sent, draws its
K x B round examples from its partition (fl_sim/partition.py), trains with clients/training.py and
replies as any Flower client does: its new weights and its example count (plus its training loss).

One addition a real deployment would not need: the client says its `partition-id`, once when the
server asks (a query message, before round 1) and in every train reply's MetricRecord. In simulation
the server sees only random node ids, and the evaluation path needs the partition to re-derive the
truth it scores reconstructions against; the answer to the query also names the sender of an error
reply, which carries nothing else. The strategy checks the reply's field against the node's answer,
removes it before aggregation, and the attack never uses it beyond naming the victim.

The run's `defense` (clients/defenses.py) is applied to what the client sends: the server sees the
defended update, never the trained one.

A client named in the run's `inject-faults` spoils its reply (or raises) on purpose, every round:
see fl_sim/faults.py.

`app` reads its settings from Flower's run config (`flwr run .`); `fl-sim run` builds one with
`make_client_app(config)` because run_simulation passes no run config.
"""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.faults import InjectedCrash, spoil_reply
from fl_sim.federation import RunConfig, cached_dataset, evaluate_model, image_spec, settings_from_config
from fl_sim.models import build_model
from fl_sim.partition import partition_indices, round_examples

from .defenses import defense_seed, parse_defense
from .training import local_train

PARTITION_KEY = "partition-id"  # simulation-only routing field of the reply, see the module docstring
LOSS_KEY = "train-loss"


def make_client_app(defaults: RunConfig | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's (if any) over `defaults`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = RunConfig.from_flower(context.run_config, defaults)
        partition_id, num_partitions = node_partition(context)
        fault = config.inject_faults.get(partition_id)
        if fault == "crash":
            raise InjectedCrash(f"client {partition_id}: injected crash (inject-faults)")
        settings = settings_from_config(msg.content["config"])
        server_round = int(msg.content["config"]["server-round"])
        dataset = cached_dataset(config.dataset, config.data_root, True)
        partition = partition_indices(dataset.labels, num_partitions, config.partition, config.alpha, config.seed)
        examples = round_examples(partition[partition_id], settings.num_images, config.seed, partition_id, server_round)
        images, labels = dataset.tensors(examples)
        global_weights = msg.content["arrays"].to_torch_state_dict()
        model = received_model(global_weights, config, dataset)
        device = next(model.parameters()).device
        loss = local_train(model, images.to(device), labels.to(device), settings)
        arrays = parse_defense(config.defense).sent_weights(
            global_weights, _cpu(model.state_dict()), [name for name, _ in model.named_parameters()],
            defense_seed(config.seed, partition_id, server_round))
        metrics = {LOSS_KEY: loss, "num-examples": len(examples), PARTITION_KEY: partition_id}
        if fault:
            arrays, metrics = spoil_reply(fault, arrays, metrics)
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node holds: the server asks once, to name the senders of error replies."""
        partition_id, _ = node_partition(context)
        return Message(RecordDict({"metrics": MetricRecord({PARTITION_KEY: partition_id})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The global model on this client's share of the test split (federated evaluation)."""
        config = RunConfig.from_flower(context.run_config, defaults)
        partition_id, num_partitions = node_partition(context)
        test = cached_dataset(config.dataset, config.data_root, False)
        share = partition_indices(test.labels, num_partitions, "iid", seed=config.seed)[partition_id]
        metrics = evaluate_model(received_model(msg.content["arrays"].to_torch_state_dict(), config, test), test, share)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def node_partition(context: Context) -> tuple[int, int]:
    """(partition id, partition count) from the node config, as Flower's simulation sets them."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(f"the node config lacks {missing}: run this ClientApp in a Flower simulation, "
                         f"or give the SuperNode --node-config 'partition-id=0 num-partitions=N'") from None


def received_model(global_weights: dict, config: RunConfig, dataset) -> torch.nn.Module:
    """The configured architecture holding the weights the server sent; on the GPU if this worker has one."""
    (channels, size, _), classes = image_spec(dataset)
    model = build_model(config.model, channels, size, classes)
    model.load_state_dict(global_weights)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _cpu(state: dict) -> dict:
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


app = make_client_app()
