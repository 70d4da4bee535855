"""Every setting of a federated run, read once from CLI flags or Flower's run config into one typed value.

`fl-sim run` flags and Flower's run config (`[tool.flwr.app.config]` of pyproject.toml, with `flwr run -c`
overrides) are two spellings of the same settings: `RunConfig.from_flower` and `RunConfig.from_values`
both go through `coerce`, which turns each value into its field's type or raises ConfigError with one
sentence (`local-steps=1.5` is an error, not 1). Strings live only at those edges: inside the program a
defense is a DefenseSpec, a fault a Fault, a strategy a StrategyName. Standard library only, so the
server, the clients and every light sub-command (`fl-sim report`) can import it.
"""
import dataclasses
import math
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode

# The names a run config may hold; the registries (fl_sim/learning/data.py, fl_sim/learning/models, attacker.PRESETS) must
# offer exactly these (tests/test_registries.py checks), so a config is checked without importing them.
DATASETS = ("mnist", "cifar10", "imagefolder")
MODELS = ("lenet", "cnn", "mlp", "resnet20", "resnet18")
ACTIVE_ATTACKS = ("imprint", "trap")  # a malicious server's analytic attacks (fl_sim/server/active.py)
PASSIVE_ATTACKS = ("dlg", "idlg", "ig")  # honest-but-curious: they change nothing in the average
ATTACKS = (*PASSIVE_ATTACKS, *ACTIVE_ATTACKS)
IMPRINT_BINS = 256  # the imprint preset's rows, when --imprint-bins is 0
TRAP_MODELS = ("mlp", "cnn")  # the models trap weights reach (fl_sim/server/active.py says why not the others)
NO_ATTACK = "none"
TRAP_EVERYONE = ("--attack trap without --attack-clients traps every client, and a trapped client's reply is "
                 "left out of the average, so the global model will not change; name the targets with "
                 "--attack-clients (e.g. 0) to let the others train it")
PARTITIONS = ("iid", "dirichlet")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


class StrategyName(StrEnum):
    """The Flower strategy the malicious server wraps (fl_sim/server/strategy.py builds it)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


class Fault(StrEnum):
    """What a faulty client does every round (`--inject-faults`, clients/mods.py)."""

    NAN = "nan"
    INF = "inf"
    WRONG_SHAPE = "wrong-shape"
    WRONG_DTYPE = "wrong-dtype"
    MISSING_ARRAY = "missing-array"
    EXTRA_ARRAY = "extra-array"
    BAD_NUM_EXAMPLES = "bad-num-examples"
    NO_NUM_EXAMPLES = "no-num-examples"
    CRASH = "crash"


FAULT_HELP = {
    Fault.NAN: "a NaN in the first weight",
    Fault.INF: "an infinity in the first weight",
    Fault.WRONG_SHAPE: "the first weight one row longer than the model's",
    Fault.WRONG_DTYPE: "the first weight as float64",
    Fault.MISSING_ARRAY: "the last weight left out",
    Fault.EXTRA_ARRAY: "an array the model does not have",
    Fault.BAD_NUM_EXAMPLES: "num-examples 10^9 (it would outweigh every other client in FedAvg)",
    Fault.NO_NUM_EXAMPLES: "no num-examples",
    Fault.CRASH: "the client raises instead of training (an error reply)",
}


class DefenseKind(StrEnum):
    NOISE = "noise"  # add N(0, SIGMA^2) to every entry of the change
    CLIP = "clip"  # scale the change down to L2 norm C
    PRUNE = "prune"  # zero the fraction P of each tensor's smallest-magnitude entries
    FP16 = "fp16"  # round the change to half precision


NO_DEFENSE, SECURE_AGGREGATION = "none", "secagg"
DEFENSE_KINDS = (NO_DEFENSE, "noise:SIGMA", "clip:C", "prune:P", "fp16", SECURE_AGGREGATION)
# kind -> (what its number means, the check it must pass); None: the kind takes no number.
DEFENSE_NUMBERS = {
    DefenseKind.NOISE: ("SIGMA, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.CLIP: ("C, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.PRUNE: ("P, a fraction in [0, 1) (1 would send no update)", lambda value: 0 <= value < 1),
    DefenseKind.FP16: None,
}


@dataclass(frozen=True)
class DefenseSpec:
    """A parsed --defense: the client's steps in order (clients/defenses.py), and whether the server
    sees only the sum of the updates (secure aggregation)."""

    steps: tuple[tuple[DefenseKind, float | None], ...] = ()
    secure_aggregation: bool = False

    @classmethod
    def parse(cls, text: str) -> "DefenseSpec":
        """'clip:4+noise:0.01' -> DefenseSpec; anything else gets a ConfigError saying what is wrong."""
        if text.strip() == NO_DEFENSE:
            return cls()
        steps, secure = [], False
        for part in (part.strip() for part in text.split("+")):
            kind, colon, number = part.partition(":")
            if kind == SECURE_AGGREGATION:
                if colon or secure:
                    raise ConfigError(f"--defense {text!r}: secagg takes no number and comes once")
                secure = True
                continue
            if kind == NO_DEFENSE:
                others = "+".join(step.strip() for step in text.split("+") if step.strip() != NO_DEFENSE)
                raise ConfigError(f"--defense {text!r}: 'none' means no defense and stands alone; to defend, "
                                  f"join only the steps, e.g. {others or 'noise:0.01'}")
            if kind not in set(DefenseKind):
                raise ConfigError(f"--defense {text!r}: {part!r} is not a defense; write steps joined by '+', "
                                  f"each one of {', '.join(DEFENSE_KINDS)} (none alone)")
            kind = DefenseKind(kind)
            number_rule = DEFENSE_NUMBERS[kind]
            if number_rule is None:
                if colon:
                    raise ConfigError(f"--defense {text!r}: {kind} takes no number")
                steps.append((kind, None))
                continue
            meaning, valid = number_rule
            try:
                value = float(number)
            except ValueError:
                value = math.nan
            if not valid(value):
                raise ConfigError(f"--defense {text!r}: {kind} needs {meaning}, got {number!r}")
            steps.append((kind, value))
        return cls(tuple(steps), secure)

    def __str__(self) -> str:
        parts = [kind if value is None else f"{kind}:{value:g}" for kind, value in self.steps]
        parts += [SECURE_AGGREGATION] if self.secure_aggregation else []
        return "+".join(parts) or NO_DEFENSE


def parse_faults(text: str) -> dict[int, Fault]:
    """'0=nan,2=crash' -> {0: Fault.NAN, 2: Fault.CRASH}; '' -> {}."""
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        client, _, kind = item.partition("=")
        try:
            client_id = int(client)
        except ValueError:
            raise ConfigError(f"--inject-faults wants client=kind pairs like 0=nan,2=crash, got {item!r}") from None
        if kind not in set(Fault):
            raise ConfigError(f"--inject-faults: unknown fault {kind!r} for client {client_id}: "
                              f"choose one of {', '.join(Fault)}")
        if client_id in faults:
            raise ConfigError(f"--inject-faults names client {client_id} twice")
        faults[client_id] = Fault(kind)
    return faults


def format_faults(faults: Mapping[int, Fault]) -> str:
    return ",".join(f"{client}={kind}" for client, kind in sorted(faults.items()))


def parse_client_list(text: str) -> tuple[int, ...] | None:
    """'0,2,5' -> (0, 2, 5); '' or 'all' -> None (every client)."""
    text = text.strip()
    if text in ("", "all"):
        return None
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"--attack-clients must be partition ids like 0,2,5 (or all), got {text!r}") from None


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run; see `fl-sim run --help` for what each means.

    Field names are the argparse names of `fl-sim run`; Flower's keys are the same with hyphens
    (FLOWER_NAMES lists the two that differ). Built directly, from flags or from Flower's run config,
    every value is coerced to its field's type (__post_init__), so a RunConfig is always typed.
    """

    out: str = "out/run"
    rounds: int = 2
    num_clients: int = 4
    dataset: str = "mnist"
    data_root: str | None = None  # None: $FL_SIM_DATA, else ./data
    model: str = "cnn"  # a ReLU ConvNet, as federations train (DLG's sigmoid LeNet hardly learns: --model lenet)
    init: str = "default"
    partition: str = "iid"
    alpha: float = 0.5
    min_shard: int = 1  # with max_shard: each client keeps a seeded number of its partition's examples in between
    max_shard: int = 0  # 0: every client keeps its whole partition
    fraction_train: float = 1.0  # the share of clients Flower samples each round
    strategy: StrategyName = StrategyName.FEDAVG
    proximal_mu: float = 0.0  # FedProx's mu (strategy fedprox only)
    server_lr: float = 0.01  # FedAdam's / FedYogi's server learning rate (eta)
    train_mode: TrainMode = TrainMode.EPOCHS
    local_steps: int = 1
    batch_size: int = 32
    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batchnorm: BatchNormMode = BatchNormMode.TRAIN
    defense: DefenseSpec = DefenseSpec()
    attack: str = "idlg"
    iterations: int = 300
    restarts: int | None = None  # None: the attack preset's
    bn_statistics: float = 0.0  # weight of the batch-norm statistics term (GradInversion); 0: off
    tv_weight: float | None = None  # weight of the total-variation image prior; None: the attack preset's
    no_replay: bool = False
    max_attack_images: int = 64  # an update of more images (epochs mode: a larger shard) is not attacked
    attack_async: bool = False  # a passive attack runs beside the next round's training (fl_sim/server/background.py)
    attack_every: int = 1
    attack_clients: tuple[int, ...] | None = None  # None: every client
    imprint_bins: int = 0  # rows of the imprint block clients build in front of the model; 0: 256 with --attack imprint
    imprint_blocks: int = 4  # the imprint's rows measure this many statistics (the server's choice only)
    client_eval: bool = False
    device: str = "auto"
    seed: int = 0
    inject_faults: dict[int, Fault] = field(default_factory=dict)  # partition id -> fault

    def __post_init__(self):
        for spec in fields(self):
            object.__setattr__(self, spec.name, coerce(spec.name, getattr(self, spec.name)))

    @classmethod
    def from_values(cls, values: Mapping[str, object], defaults: "RunConfig | None" = None) -> "RunConfig":
        """Field name -> value (e.g. the flags a user gave) over `defaults`; unknown names are errors."""
        unknown = sorted(set(values) - {spec.name for spec in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
        return dataclasses.replace(defaults or cls(), **values)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object], defaults: "RunConfig | None" = None) -> "RunConfig":
        """Flower's run config (hyphenated keys) over `defaults`; an unknown key is an error, not ignored."""
        by_key = {flower_key(spec.name): spec.name for spec in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}: known are {', '.join(by_key)}")
        return cls.from_values({by_key[key]: value for key, value in run_config.items()}, defaults)

    def to_flower(self) -> dict[str, object]:
        """The run config as Flower keys and TOML-able values (the inverse of from_flower)."""
        return {flower_key(spec.name): to_text(getattr(self, spec.name)) if spec.name != "restarts"
                else (self.restarts or 0) for spec in fields(self)}

    @property
    def imprint_rows(self) -> int:
        """The imprint block's rows in the architecture every client builds (0: no block)."""
        return self.imprint_bins or (IMPRINT_BINS if self.attack == "imprint" else 0)

    @property
    def settings(self) -> TrainingSettings:
        """The local training the server configures every round."""
        try:
            return TrainingSettings(lr=self.lr, local_steps=self.local_steps, batch_size=self.batch_size,
                                    epochs=self.epochs, momentum=self.momentum, batchnorm=self.batchnorm,
                                    proximal_mu=self.proximal_mu, mode=self.train_mode,
                                    weight_decay=self.weight_decay)
        except ValueError as error:  # its messages start with the setting's name: the flag's, without "--"
            raise ConfigError(f"--{error}") from None

    def check(self) -> None:
        """Every check that needs neither data nor torch, before any work starts (raises ConfigError)."""
        for name, allowed in (("dataset", DATASETS), ("model", MODELS), ("partition", PARTITIONS),
                              ("attack", (*ATTACKS, NO_ATTACK))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name, least in (("rounds", 1), ("num_clients", 1), ("iterations", 1), ("attack_every", 1), ("seed", 0),
                            ("min_shard", 1), ("max_shard", 0), ("max_attack_images", 1), ("imprint_bins", 0),
                            ("imprint_blocks", 1)):
            if getattr(self, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}")
        if self.attack == "trap" and self.model not in TRAP_MODELS:
            raise ConfigError(f"trap weights reach only {', '.join(TRAP_MODELS)} (a ReLU linear layer that sees the "
                              f"whole image), not {self.model}: use --attack imprint for it (docs/threat-models.md)")
        if self.attack == "imprint" and self.imprint_rows % self.imprint_blocks:
            raise ConfigError(f"--imprint-bins {self.imprint_rows} must split evenly into --imprint-blocks "
                              f"{self.imprint_blocks}")
        if self.tv_weight is not None and self.tv_weight < 0:
            raise ConfigError(f"--tv-weight must be at least 0, got {self.tv_weight}")
        if self.bn_statistics < 0:
            raise ConfigError(f"--bn-statistics must be at least 0, got {self.bn_statistics}")
        if self.attack_async and self.attack in ACTIVE_ATTACKS:
            raise ConfigError(f"--attack-async runs only passive attacks ({', '.join(PASSIVE_ATTACKS)}) in the "
                              f"background: {self.attack} arms the weights the server sends and decides what of "
                              f"its targets' replies enters the average, so it is part of the round; drop "
                              f"--attack-async or choose a passive attack")
        if self.restarts is not None and self.restarts < 1:
            raise ConfigError(f"--restarts must be at least 1, got {self.restarts}")
        for name in ("alpha", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"--fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.max_shard and self.max_shard < self.min_shard:
            raise ConfigError(f"--max-shard {self.max_shard} is below --min-shard {self.min_shard}")
        if self.proximal_mu and self.strategy != StrategyName.FEDPROX:
            raise ConfigError(f"--proximal-mu is FedProx's: use it with --strategy fedprox, not {self.strategy}")
        self.settings  # noqa: B018 (raises ConfigError for a bad training setting)
        outside = [c for c in self.attack_clients or () if not 0 <= c < self.num_clients]
        if outside:
            raise ConfigError(f"--attack-clients {outside} are not clients 0..{self.num_clients - 1}")
        outside = sorted(c for c in self.inject_faults if not 0 <= c < self.num_clients)
        if outside:
            raise ConfigError(f"--inject-faults names {outside}, not clients 0..{self.num_clients - 1}")
        if self.attack_clients is not None and self.defense.secure_aggregation:
            raise ConfigError("--attack-clients cannot pick clients under secure aggregation: the server "
                              "sees only their sum, so leave it out")


# Flower keys whose field is named differently (the flag is --rounds / --out; Flower's usual keys are these).
FLOWER_NAMES = {"rounds": "num-server-rounds", "out": "out-dir"}
FIELD_TYPES = typing.get_type_hints(RunConfig)


def flower_key(name: str) -> str:
    return FLOWER_NAMES.get(name, name.replace("_", "-"))


def coerce(name: str, value: object) -> object:
    """`value` as field `name`'s type, or a ConfigError naming the flag and what it must be."""
    kind = FIELD_TYPES[name]
    flag = f"--{name.replace('_', '-')}"
    if name == "attack_clients":
        return parse_client_list(value) if isinstance(value, str) else (
            None if value is None else tuple(sorted({coerce_scalar(int, v, flag) for v in value})))
    if name == "inject_faults":
        return parse_faults(value) if isinstance(value, str) else \
            parse_faults(",".join(f"{client}={fault}" for client, fault in value.items()))
    if name == "defense":
        return value if isinstance(value, DefenseSpec) else DefenseSpec.parse(coerce_scalar(str, value, flag))
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # `X | None`: TOML has no null: "" (and 0 for a count) mean None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if value is None or value == "" or (kind is int and value == 0):  # a weight of 0 is a weight
            return None
    return coerce_scalar(kind, value, flag)


def coerce_scalar(kind: type, value: object, flag: str) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{flag} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{flag} must be one of {', '.join(kind)}, got {value!r}") from None
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{flag} must be text, got {value!r}")
    raise TypeError(f"no coercion to {kind} for {flag}")


def to_text(value: object) -> object:
    """A field's value as Flower's run config holds it (TOML: no None, no tuples, no dicts)."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return format_faults(value)
    if isinstance(value, (StrEnum, DefenseSpec)):
        return str(value)
    return value


def trap_starves(attack: str, attack_clients) -> bool:
    """Trap weights on every client leave nothing to average (docs/threat-models.md)."""
    return attack == "trap" and attack_clients is None


def check_run(config: RunConfig) -> None:
    """RunConfig.check, plus what it leaves to the file system: the --init checkpoint and the output folder."""
    config.check()
    if config.init not in ("default", "paper") and not Path(config.init).is_file():
        raise ConfigError(f"--init {config.init!r} is neither 'default', 'paper' nor an existing checkpoint file")
    check_writable(config.out)


def check_writable(folder) -> None:
    """Tries a file in the nearest existing folder on the way (permissions, read-only disks), leaving nothing."""
    path = Path(folder)
    probe = path
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise ConfigError(f"output folder {str(path)!r} cannot be written ({str(probe)!r} is not a writable folder)") \
            from None
