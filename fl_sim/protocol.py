"""The contract between the server and its clients: message keys and the training the server configures.

Both sides import this module, and so does the attacker (which must know the training it replays).
It imports nothing but the standard library, so nobody pulls in Flower, torch or the other side by
importing it. The run config that both sides read lives beside it, in fl_sim/run_config.py.
"""
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

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


class BatchNormMode(StrEnum):
    """How batch-norm layers behave in local training."""

    TRAIN = "train"  # normalise each batch by its own statistics, update the running ones (PyTorch's train mode)
    FROZEN = "frozen"  # use the model's running statistics and leave them as they are (eval mode for those layers)


@dataclass(frozen=True)
class TrainingSettings:
    """The local training the server configured, which it therefore knows.

    A client runs `epochs` passes over its K x B round examples, `local_steps` (K) SGD steps per pass,
    each on its own batch of `batch_size` (B) examples in a fixed order, with learning rate `lr`,
    optional heavy-ball `momentum` (torch.optim.SGD semantics) and FedProx's proximal term
    `proximal_mu / 2 * ||w - w_global||^2`. K = 1, epochs = 1 is FedSGD. `batchnorm`: see BatchNormMode;
    "frozen" is how the Inverting Gradients paper computes its target gradients.
    """

    lr: float
    local_steps: int = 1
    batch_size: int = 1
    epochs: int = 1
    momentum: float = 0.0
    batchnorm: BatchNormMode = BatchNormMode.TRAIN
    proximal_mu: float = 0.0

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
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal-mu must be non-negative, got {self.proximal_mu}")
        try:
            object.__setattr__(self, "batchnorm", BatchNormMode(self.batchnorm))
        except ValueError:
            raise ValueError(f"batchnorm must be one of {', '.join(BatchNormMode)}, got {self.batchnorm!r}") from None

    @property
    def num_images(self) -> int:
        """How many distinct images stand behind one update."""
        return self.local_steps * self.batch_size

    @property
    def total_steps(self) -> int:
        return self.local_steps * self.epochs

    def as_single_gradient(self) -> "TrainingSettings":
        """The naive view (`--no-replay`): the update divided by (steps x lr) as one gradient of all images.

        One step with learning rate steps x lr on one batch of all K x B images yields exactly that.
        """
        return replace(self, lr=self.lr * self.total_steps, local_steps=1, epochs=1,
                       batch_size=self.num_images, momentum=0.0, proximal_mu=0.0)

    def for_mean_of(self, clients: int) -> "TrainingSettings":
        """The training behind a mean of `clients` updates (what secure aggregation reveals): each step on
        all their batches. Exact for one local step (the mean of the clients' gradients is the gradient of
        their union); with more steps it ignores that each client's model moved on its own."""
        return replace(self, batch_size=self.batch_size * clients)

    def to_config(self) -> dict[str, int | float | str]:
        """The entries of the ConfigRecord the server sends each round."""
        return {key: (str(value) if isinstance(value, StrEnum) else value)
                for key, value in ((key, getattr(self, name)) for key, name in TRAINING_KEYS.items())}

    @classmethod
    def from_config(cls, config: Mapping) -> "TrainingSettings":
        """What a client reads from the server's ConfigRecord (and what the server attacks with).

        FedProx's `proximal-mu` is optional (other strategies do not send it); the rest must be there.
        """
        missing = [key for key in TRAINING_KEYS if key not in config and key != PROXIMAL_MU]
        if missing:
            raise ValueError(f"the server's train config lacks {', '.join(missing)}")
        return cls(**{name: config[key] for key, name in TRAINING_KEYS.items() if key in config})


# ConfigRecord key -> TrainingSettings field.
TRAINING_KEYS = {"local-steps": "local_steps", "batch-size": "batch_size", "epochs": "epochs", "lr": "lr",
                 "momentum": "momentum", "batchnorm": "batchnorm", PROXIMAL_MU: "proximal_mu"}
