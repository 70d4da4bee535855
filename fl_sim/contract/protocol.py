"""The contract between the server and its clients: message keys and the training the server configures.

Both sides import this module, and so does the attacker (which must know the training it replays).
It imports nothing but the standard library, so nobody pulls in Flower, torch or the other side by
importing it. The run config that both sides read lives beside it, in fl_sim/contract/run_config.py.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntFlag, StrEnum

# Record names and keys of the messages (Flower's defaults where Flower has one).
ARRAYS = "arrays"  # the ArrayRecord of a train message and of its reply
CONFIG = "config"  # the ConfigRecord of a train or evaluate message
METRICS = "metrics"  # the MetricRecord of a reply
NUM_EXAMPLES = "num-examples"  # what FedAvg weighs a reply by
SERVER_ROUND = "server-round"  # set by Flower's strategies in every config they send
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx: the weight of the proximal term
TRAIN_LOSS = "train-loss"
# Simulation only: Flower gives the server random node ids, so each client says which partition it holds
# (once when asked, and in every train reply); the server strips it before aggregating.
PARTITION_ID = "partition-id"
# the ArrayRecord in which a user's ClientApp, in a simulation only, discloses what it trained on (fl_sim.disclose)
DISCLOSED = "fl-sim-disclosed"
# `--defense inspect` (clients/inspection.py): in flag mode every train reply says which checks the model it was
# sent failed, as a bit mask of clients.inspection.Check (0: none); in refuse mode a client that refuses
# sends an error reply of this code, whose reason names the failed checks.
INSPECT_FLAGS = "inspect-flags"
INSPECTION_REFUSED = 4024  # an Error code of the ClientApp's own (Flower's run from 0 to a few)


class InspectionCheck(IntFlag):
    """The checks of a received model a client may fail (clients/inspection.py says what each of the inspection's
    looks at, clients/detectors/ the other detectors'); a reply's `inspect-flags` metric is their bit mask."""

    ARCHITECTURE = 1
    NON_FINITE = 2
    ZERO_ENTRIES = 4
    ZERO_BIAS = 8
    DUPLICATE_ROWS = 16
    JUMP = 32
    FROZEN = 64
    PEAKED = 128
    # the detectors of their own (fl_sim/contract/detectors.py, clients/detectors/), each one bit
    DSNR = 256
    STRICT_LOAD = 512
    SIZE = 1024
    LONE_UNITS = 2048

    @property
    def label(self) -> str:
        """The check's name in reasons and metrics rows: `duplicate-rows`."""
        return (self.name or str(int(self))).lower().replace("_", "-")


def inspection_labels(mask: int) -> list[str]:
    """The names of the checks in an `inspect-flags` bit mask, in InspectionCheck's order ([] for 0)."""
    return [check.label for check in InspectionCheck if mask & check]
# --defense dpsgd: the epsilon a client's DP-SGD spent in this round, and in rounds 1..this one (clients/privacy.py)
DP_EPSILON_ROUND = "dp-epsilon-round"
DP_EPSILON = "dp-epsilon"
DP_METRICS = (DP_EPSILON_ROUND, DP_EPSILON)


class BatchNormMode(StrEnum):
    """How batch-norm layers behave in local training."""

    TRAIN = "train"  # normalise each batch by its own statistics, update the running ones (PyTorch's train mode)
    FROZEN = "frozen"  # use the model's running statistics and leave them as they are (eval mode for those layers)


class TrainMode(StrEnum):
    """What a client trains on in a round."""

    FEDSGD = "fedsgd"  # one step on B examples drawn for the round
    STEPS = "steps"  # K steps of B examples drawn for the round, the K x B in a fixed order, `epochs` times over
    EPOCHS = "epochs"  # `epochs` passes over the client's whole shard, shuffled each epoch (Flower's template)


@dataclass(frozen=True)
class TrainingSettings:
    """The local training the server configured, which it therefore knows.

    In `steps` mode a client runs `epochs` passes over its K x B round examples, `local_steps` (K) SGD
    steps per pass, each on its own batch of `batch_size` (B) examples in a fixed order; `fedsgd` is K = 1,
    one pass. In `epochs` mode it makes `epochs` passes over its whole shard (`shard_size` n examples,
    which the server learns from the reply's num-examples) in batches of B, reshuffled each epoch with a
    seed only the client knows; the last batch of an epoch is smaller when B does not divide n (it is not
    dropped, as with PyTorch's DataLoader). SGD has learning rate `lr`, optional heavy-ball `momentum` and
    `weight_decay` (torch.optim.SGD semantics), and FedProx's proximal term `proximal_mu / 2 * ||w - w_global||^2`.
    `batchnorm`: see BatchNormMode; "frozen" is how the Inverting Gradients paper computes its target gradients.
    """

    lr: float
    local_steps: int = 1
    batch_size: int = 1
    epochs: int = 1
    momentum: float = 0.0
    batchnorm: BatchNormMode = BatchNormMode.TRAIN
    proximal_mu: float = 0.0
    mode: TrainMode = TrainMode.STEPS
    weight_decay: float = 0.0
    shard_size: int | None = None  # epochs mode: n, known to the server from a client's reply

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("local_steps", "batch_size", "epochs"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"{name.replace('_', '-')} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        for name in ("proximal_mu", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        for name, kind in (("batchnorm", BatchNormMode), ("mode", TrainMode)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ValueError(f"{name} must be one of {', '.join(kind)}, got {getattr(self, name)!r}") from None
        if self.mode == TrainMode.FEDSGD and (self.local_steps, self.epochs) != (1, 1):
            raise ValueError(f"local-steps and epochs are 1 in fedsgd (one step), got {self.local_steps} and "
                             f"{self.epochs}: use --train-mode steps or epochs for more")
        if self.shard_size is not None and (type(self.shard_size) is not int or self.shard_size < 1):
            raise ValueError(f"shard size must be a positive integer, got {self.shard_size!r}")

    @property
    def num_images(self) -> int:
        """How many distinct images stand behind one update."""
        if self.mode == TrainMode.EPOCHS:
            if self.shard_size is None:
                raise ValueError("in epochs mode the images behind an update are the client's shard: "
                                 "its size comes with the reply (TrainingSettings.for_shard)")
            return self.shard_size
        return self.local_steps * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size) if self.mode == TrainMode.EPOCHS else self.local_steps

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def single_step(self, images: int | None = None) -> bool:
        """Whether a client's round is one SGD step: one step in steps mode (K = E = 1); in epochs mode one epoch
        over a shard that fits one batch (its `shard_size`, else `images`, the most a client holds; neither known:
        not one step).

        Parameters
        ----------
        images : int, optional
            Epochs mode without a shard size: the most examples a client holds.

        Returns
        -------
        bool
            True when the client takes exactly one step.
        """
        if self.mode != TrainMode.EPOCHS:
            return self.local_steps * self.epochs == 1
        shard = self.shard_size if self.shard_size is not None else images
        return self.epochs == 1 and shard is not None and shard <= self.batch_size

    def batch_slices(self) -> list[slice]:
        """The positions of each step's batch among the num_images images of one epoch (the last may be short)."""
        size, count = self.batch_size, self.num_images
        return [slice(start, min(start + size, count)) for start in range(0, self.steps_per_epoch * size, size)]

    def for_shard(self, size: int) -> "TrainingSettings":
        """The settings of a client whose reply says it trained on `size` examples (epochs mode: its shard)."""
        return replace(self, shard_size=size) if self.mode == TrainMode.EPOCHS else self

    def as_single_gradient(self) -> "TrainingSettings":
        """The naive view (`--no-replay`): the update divided by (steps x lr) as one gradient of all images.

        One step with learning rate steps x lr on one batch of all K x B images yields exactly that.
        """
        return replace(self, lr=self.lr * self.total_steps, local_steps=1, epochs=1, batch_size=self.num_images,
                       momentum=0.0, proximal_mu=0.0, weight_decay=0.0, mode=TrainMode.STEPS, shard_size=None)

    def for_mean_of(self, clients: int) -> "TrainingSettings":
        """The training behind a mean of `clients` updates (what secure aggregation reveals): each step on
        all their batches. Exact for one local step (the mean of the clients' gradients is the gradient of
        their union); with more steps it ignores that each client's model moved on its own."""
        return replace(self, batch_size=self.batch_size * clients)

    def to_config(self) -> dict[str, int | float | str]:  # shard_size is the client's to say, not the server's
        """The entries of the ConfigRecord the server sends each round."""
        return {key: (str(value) if isinstance(value, StrEnum) else value)
                for key, value in ((key, getattr(self, name)) for key, name in TRAINING_KEYS.items())}

    @classmethod
    def from_config(cls, config: Mapping) -> "TrainingSettings":
        """What a client reads from the server's ConfigRecord (and what the server attacks with).

        FedProx's `proximal-mu` is optional (other strategies do not send it), and so are `train-mode` and
        `weight-decay` (a server of before they existed sends steps without decay); the rest must be there.
        """
        missing = [key for key in TRAINING_KEYS if key not in config and key not in OPTIONAL_KEYS]
        if missing:
            raise ValueError(f"the server's train config lacks {', '.join(missing)}")
        return cls(**{name: config[key] for key, name in TRAINING_KEYS.items() if key in config})


def server_round_of(config: Mapping[str, object]) -> int:
    """The round number Flower's strategies put in every config they send."""
    value = config[SERVER_ROUND]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the server's config holds {SERVER_ROUND} {value!r}, not a round number")
    return value


# ConfigRecord key -> TrainingSettings field.
TRAINING_KEYS = {"local-steps": "local_steps", "batch-size": "batch_size", "epochs": "epochs", "lr": "lr",
                 "momentum": "momentum", "batchnorm": "batchnorm", PROXIMAL_MU: "proximal_mu",
                 "train-mode": "mode", "weight-decay": "weight_decay"}
OPTIONAL_KEYS = (PROXIMAL_MU, "train-mode", "weight-decay")
