"""What a ClientApp reads from its Flower context: the run config, which partition this node holds, and the
examples it trains on in a round."""
import numpy as np
from flwr.app import Context

from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import ImageDataset, cached_dataset
from fl_sim.learning.partition import client_shards, training_examples


def run_config_of(context: Context, defaults: RunConfig | None = None) -> RunConfig:
    """Flower's run config (`flwr run`) over `defaults` (`fl-sim run`, whose simulation passes none)."""
    return RunConfig.from_flower(context.run_config, defaults)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition id, partition count) from the node config, as Flower's simulation sets them."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as missing:
        raise ValueError(f"the node config lacks {missing}: run this ClientApp in a Flower simulation, "
                         f"or give the SuperNode --node-config 'partition-id=0 num-partitions=N'") from None


def round_examples(config: RunConfig, partition_id: int, num_partitions: int, settings: TrainingSettings,
                   server_round: int) -> tuple[ImageDataset, np.ndarray, np.ndarray]:
    """The training split, the client's shard and the examples it trains on in `server_round` (its shard in
    epochs mode, else the K x B drawn for the round), as indices.

    Parameters
    ----------
    config : RunConfig
        The run's config (data set, partition, seed).
    partition_id, num_partitions : int
        This node's partition and the partition count.
    settings : TrainingSettings
        The round's training, as the server sent it.
    server_round : int
        The round.

    Returns
    -------
    tuple
        The training split, the shard's indices and the round's example indices.
    """
    dataset = cached_dataset(config.dataset, config.data_root, True)
    shards = client_shards(dataset.labels, num_partitions, config.partition, config.alpha, config.seed,
                           config.min_shard, config.max_shard)
    shard = shards[partition_id]
    return dataset, shard, training_examples(shard, settings, config.seed, partition_id, server_round)
