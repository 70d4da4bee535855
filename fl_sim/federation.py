"""What the server and the clients of a federated run share: its config, the data and model it names.

A run is configured once, either from `fl-sim run` flags or from Flower's run config (the
`[tool.flwr.app.config]` table of pyproject.toml, with `flwr run -c` overrides). `RunConfig` holds
both forms; its field names are the argparse names of `fl-sim run`, so fl_sim/config.py checks it.
"""
import dataclasses
import functools
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from attacker.settings import TrainingSettings

from . import config as flags
from .data import ImageDataset, load_dataset
from .faults import format_faults, parse_faults
from .partition import PARTITIONS

# The training settings the server sends with every round, under these ConfigRecord keys.
TRAINING_KEYS = {"local-steps": "local_steps", "batch-size": "batch_size", "epochs": "epochs", "lr": "lr",
                 "momentum": "momentum", "batchnorm": "batchnorm"}
# Flower keys whose field is named differently (the flag is --rounds / --out; Flower's usual keys are these).
FLOWER_NAMES = {"rounds": "num-server-rounds", "out": "out-dir"}


@dataclass
class RunConfig:
    """Every setting of one federated run; see `fl-sim run --help` for what each means."""

    out: str = "out/run"
    rounds: int = 2
    num_clients: int = 4
    dataset: str = "mnist"
    data_root: str | None = None  # None: $FL_SIM_DATA, else ./data
    model: str = "lenet"
    init: str = "default"
    partition: str = "iid"
    alpha: float = 0.5
    local_steps: int = 1
    batch_size: int = 1
    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    batchnorm: str = "train"  # or "frozen": see attacker.settings.TrainingSettings
    defense: str = "none"  # clients/defenses.py
    attack: str = "idlg"
    iterations: int = 300
    restarts: int | None = None  # None: the attack preset's
    no_replay: bool = False
    attack_every: int = 1
    attack_clients: tuple[int, ...] | None = None  # None: every client
    client_eval: bool = False
    device: str = "auto"
    seed: int = 0
    inject_faults: dict[int, str] = field(default_factory=dict)  # partition id -> fault kind (fl_sim/faults.py)

    @classmethod
    def from_args(cls, args) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        if isinstance(values.get("attack_clients"), str):
            values["attack_clients"] = parse_client_list(values["attack_clients"])
        if isinstance(values.get("inject_faults"), str):
            values["inject_faults"] = parse_faults(values["inject_faults"])
        return cls(**values)

    @classmethod
    def from_flower(cls, run_config: dict, defaults: "RunConfig | None" = None) -> "RunConfig":
        """Flower's run config (hyphenated keys) over `defaults`; an unknown key is an error, not ignored."""
        base = defaults or cls()
        by_key = {flower_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise flags.ConfigError(f"unknown run-config key(s) {', '.join(unknown)}: known are {', '.join(by_key)}")
        values = {}
        for key, value in run_config.items():
            name = by_key[key]
            if name == "attack_clients":
                value = parse_client_list(str(value))
            elif name == "inject_faults":
                value = parse_faults(str(value))
            elif name in ("data_root", "restarts"):  # TOML has no null: "" and 0 stand for "the default"
                value = value or None
            values[name] = value
        return dataclasses.replace(base, **values)

    def to_flower(self) -> dict:
        """The run config as Flower keys and TOML-able values (the inverse of from_flower)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "attack_clients":
                value = ",".join(map(str, value)) if value is not None else ""
            elif f.name == "inject_faults":
                value = format_faults(value)
            elif value is None:
                value = 0 if f.name == "restarts" else ""
            values[flower_key(f.name)] = value
        return values

    def check(self) -> None:
        """Every check that needs no data, before any work starts (raises ConfigError)."""
        flags.check_task_arguments(self)
        if self.rounds < 1:
            raise flags.ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.num_clients < 1:
            raise flags.ConfigError(f"--num-clients must be at least 1, got {self.num_clients}")
        if self.partition not in PARTITIONS:
            raise flags.ConfigError(f"--partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not self.alpha > 0:
            raise flags.ConfigError(f"--alpha must be positive, got {self.alpha}")
        if self.attack_every < 1:
            raise flags.ConfigError(f"--attack-every must be at least 1, got {self.attack_every}")
        if self.seed < 0:
            raise flags.ConfigError(f"--seed must be non-negative, got {self.seed}")
        outside = [c for c in self.attack_clients or () if not 0 <= c < self.num_clients]
        if outside:
            raise flags.ConfigError(f"--attack-clients {outside} are not clients 0..{self.num_clients - 1}")
        outside = sorted(c for c in self.inject_faults if not 0 <= c < self.num_clients)
        if outside:
            raise flags.ConfigError(f"--inject-faults names {outside}, not clients 0..{self.num_clients - 1}")
        if self.attack_clients is not None and flags.defense(self).secure_aggregation:
            raise flags.ConfigError("--attack-clients cannot pick clients under secure aggregation: the server "
                                    "sees only their sum, so leave it out")

    @property
    def settings(self) -> TrainingSettings:
        return flags.training_settings(self)


def flower_key(name: str) -> str:
    return FLOWER_NAMES.get(name, name.replace("_", "-"))


def parse_client_list(text: str) -> tuple[int, ...] | None:
    """'0,2,5' -> (0, 2, 5); '' or 'all' -> None (every client)."""
    text = text.strip()
    if text in ("", "all"):
        return None
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise flags.ConfigError(f"--attack-clients must be partition ids like 0,2,5 (or all), got {text!r}") from None


def settings_to_config(settings: TrainingSettings) -> dict:
    """TrainingSettings -> the ConfigRecord entries the server sends each round."""
    return {key: getattr(settings, name) for key, name in TRAINING_KEYS.items()}


def settings_from_config(config) -> TrainingSettings:
    """What a client reads from the server's ConfigRecord (and what the server attacks with)."""
    missing = [key for key in TRAINING_KEYS if key not in config]
    if missing:
        raise ValueError(f"the server's train config lacks {', '.join(missing)}")
    return TrainingSettings(**{name: config[key] for key, name in TRAINING_KEYS.items()})


@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, data_root: str | None, train: bool) -> ImageDataset:
    """A split loaded once per process: clients run many rounds in one long-lived worker."""
    return load_dataset(name, data_root, train=train)


def image_spec(dataset: ImageDataset) -> tuple[tuple[int, int, int], int]:
    """((C, H, W), classes) of a data set: all the attacker knows about its inputs."""
    return (dataset.channels, dataset.image_size, dataset.image_size), dataset.num_classes


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: ImageDataset, indices, batch_size: int = 1000) -> dict:
    """Accuracy and mean cross-entropy of `model` on the given examples of `dataset`."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(indices), batch_size):
        images, labels = dataset.tensors(indices[start: start + batch_size])
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    count = len(indices)
    return {"accuracy": correct / count, "loss": loss_sum / count, "num-examples": count}
