"""The Flower ClientApp: an honest client per partition of the training set.

Each round a client takes the global weights and the training settings the server sent, takes its
shard (fl_sim/learning/partition.py): the whole shard in epochs mode, else the K x B examples drawn for the round,
trains with clients/training.py and replies as any Flower client does: its new weights and its example
count (plus its training loss). With `--defense dpsgd:...` it trains with DP-SGD and also reports the epsilon
it spent in the round and in the run so far (`dp-epsilon-round`, `dp-epsilon`; clients/privacy.py). In
epochs mode it shuffles with a seed of its own (`order_seed`), which the server never learns.
The run's `--defense` and `--inject-faults` are Flower mods around it (clients/mods.py), not part of it; outside
them all, `ExpandRowsMod` (clients/transport.py) expands a tensor the server sent as its distinct rows.

One addition a real deployment would not need: the client says its `partition-id`, once when the server
asks (a query message, before round 1) and in every train reply's MetricRecord. In simulation the server
sees only random node ids, and the evaluation path needs the partition to re-derive the truth it scores
reconstructions against; the answer to the query also names the sender of an error reply, which carries
nothing else. The strategy checks the reply's field against the node's answer and removes it before
aggregation; the attack never uses it beyond naming the victim.

`app` reads its settings from Flower's run config (`flwr run .`); `fl-sim run` builds one with
`make_client_app(config)` because run_simulation passes no run config.
"""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.contract.protocol import (
    ARRAYS,
    CONFIG,
    DP_EPSILON,
    DP_EPSILON_ROUND,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    TRAIN_LOSS,
    TrainingSettings,
    server_round_of,
)
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.accuracy import evaluate_model
from fl_sim.learning.data import cached_dataset, image_spec
from fl_sim.learning.models import build_model
from fl_sim.learning.partition import partition_indices

from .context import node_partition, round_examples, run_config_of
from .defenses import defense_seed, order_seed
from .mods import mods_for
from .privacy import DP_STREAM, spent
from .training import local_train
from .transport import ExpandRowsMod


def make_client_app(defaults: RunConfig | None = None) -> ClientApp:
    """A ClientApp whose run config is Flower's (if any) over `defaults`, with the mods the run needs."""
    app = ClientApp(mods=[ExpandRowsMod(), *mods_for(defaults)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = run_config_of(context, defaults)
        partition_id, num_partitions = node_partition(context)
        settings = TrainingSettings.from_config(msg.content.config_records[CONFIG])
        server_round = server_round_of(msg.content.config_records[CONFIG])
        dataset, shard, examples = round_examples(config, partition_id, num_partitions, settings, server_round)
        images, labels = dataset.tensors(examples)
        model = received_model(msg.content.array_records[ARRAYS].to_torch_state_dict(), config, dataset)
        device = next(model.parameters()).device
        dp = config.defense.dpsgd
        loss = local_train(model, images.to(device), labels.to(device), settings,
                           order_seed=order_seed(config.seed, partition_id, server_round), dp=dp,
                           noise_seed=defense_seed(config.seed, partition_id, server_round, DP_STREAM))
        arrays = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        metrics: dict[str, int | float | list[int] | list[float]] = {
            TRAIN_LOSS: loss, NUM_EXAMPLES: len(examples), PARTITION_ID: partition_id}
        if dp is not None:
            metrics[DP_EPSILON_ROUND], metrics[DP_EPSILON] = spent(dp, settings, len(shard), server_round)
        return Message(RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Which partition this node holds: the server asks once, to name the senders of error replies."""
        partition_id, _ = node_partition(context)
        return Message(RecordDict({METRICS: MetricRecord({PARTITION_ID: partition_id})}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """The global model on this client's share of the test split (federated evaluation)."""
        config = run_config_of(context, defaults)
        partition_id, num_partitions = node_partition(context)
        test = cached_dataset(config.dataset, config.data_root, False)
        share = partition_indices(test.labels, num_partitions, "iid", seed=config.seed)[partition_id]
        model = received_model(msg.content.array_records[ARRAYS].to_torch_state_dict(), config, test)
        metrics = evaluate_model(model, test, share)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app




def received_model(global_weights: dict, config: RunConfig, dataset) -> torch.nn.Module:
    """The configured architecture holding the weights the server sent; on the GPU if this worker has one.

    The architecture is built on torch's meta device and given uninitialised memory before the sent weights are
    loaded (strictly: every parameter and buffer): an initialisation the weights overwrite at once is not drawn
    (the mosaic's block of a 1000-client round is 25 million weights a client)."""
    (channels, size, _), classes = image_spec(dataset)
    with torch.device("meta"):
        model = build_model(config.model, channels, size, classes, imprint=config.imprint_rows)
    model = model.to_empty(device="cpu")
    model.load_state_dict(global_weights)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


app = make_client_app()
