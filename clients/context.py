"""What a ClientApp reads from its Flower context: the run config, and which partition this node holds."""
from flwr.app import Context

from fl_sim.contract.run_config import RunConfig


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
