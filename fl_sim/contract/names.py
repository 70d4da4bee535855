"""The names a run setting chooses among, where the registry that offers them lives outside the contract.

Each registry keys itself by these names (tests/test_registries.py checks they agree): the data sets
(fl_sim/learning/data.py), the partition schemes (fl_sim/learning/partition.py) and the Flower strategies
(fl_sim/server/strategy.py `flower_strategy`). Models and attacks have registries of their own in the
contract (fl_sim/contract/models.py, fl_sim/contract/attacks.py). Standard library only.
"""
from enum import StrEnum

from fl_sim.contract.setting import Name


class DatasetName(Name):
    """The data sets fl_sim/learning/data.py loads."""

    MNIST = "mnist"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"


class PartitionScheme(Name):
    """How fl_sim/learning/partition.py splits the training set among the clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class StrategyName(StrEnum):
    """The Flower strategy the malicious server wraps (fl_sim/server/strategy.py builds it)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class Device(StrEnum):
    """Where the attack computes (attacker.resolve_device); `cuda:N` names one GPU as well."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


# The names as tuples, for the modules that list them in messages.
DATASETS, PARTITIONS = tuple(DatasetName), tuple(PartitionScheme)
