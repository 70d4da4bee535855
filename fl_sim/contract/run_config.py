"""Every setting of a federated run, read once from CLI flags or Flower's run config into one typed value.

`fl-sim run` flags and Flower's run config (`[tool.flwr.app.config]` of pyproject.toml, with `flwr run -c`
overrides) are two spellings of the same settings: `RunConfig.from_flower` and `RunConfig.from_values`
both go through `coerce`, which turns each value into its field's type or raises ConfigError with one
sentence (`local-steps=1.5` is an error, not 1). Strings live only at those edges: inside the program a
defense is a DefenseSpec, a fault a Fault, a strategy a StrategyName, a model a ModelName. Each field is
the one declaration of its setting: type, default and `Setting` (help, bounds, Flower key), from which
fl_sim/commands/config.py builds the flags and `RunConfig.check` the bounds; pyproject.toml repeats the
defaults (tests/test_settings.py checks). Standard library only, so the server, the clients and every
light sub-command (`fl-sim report`) can import it.
"""
import dataclasses
import math
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path

from fl_sim.contract.attacks import NO_ATTACK, attack_names, attack_specs, find_attack
from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode

# Attacks are named by their own registry, fl_sim/contract/attacks.py.
SECAGG_MODULUS = 2**32  # SecAgg+'s masks are drawn modulo this (Flower's default modulus_range, kept)
IMPRINT_BINS = 256  # the imprint block's rows for an attack that needs it, when --imprint-bins is 0
TRAP_EVERYONE = ("--attack trap without --attack-clients traps every client, and a trapped client's reply is "
                 "left out of the average, so the global model will not change; name the targets with "
                 "--attack-clients (e.g. 0) to let the others train it")


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


class Name(StrEnum):
    """A name a registry outside the contract must offer exactly (tests/test_registries.py checks), so a config
    is checked without importing the registry; a wrong one is an "unknown <setting>" error."""


class DatasetName(Name):
    """The data sets fl_sim/learning/data.py loads."""

    MNIST = "mnist"
    CIFAR10 = "cifar10"
    IMAGEFOLDER = "imagefolder"


class ModelName(Name):
    """The models fl_sim/learning/models builds."""

    LENET = "lenet"
    CNN = "cnn"
    MLP = "mlp"
    RESNET20 = "resnet20"
    RESNET18 = "resnet18"


class PartitionScheme(Name):
    """How fl_sim/learning/partition.py splits the training set among the clients."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class Device(StrEnum):
    """Where the attack computes (attacker.resolve_device); `cuda:N` names one GPU as well."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


# The names as tuples, for the modules that list them in messages.
DATASETS, MODELS, PARTITIONS = tuple(DatasetName), tuple(ModelName), tuple(PartitionScheme)


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


class InspectionMode(StrEnum):
    """What a client with `--defense inspect` does with a model that fails its checks (clients/inspection.py)."""

    REFUSE = "refuse"  # an error reply saying why, instead of training (the server records it as refused)
    FLAG = "flag"  # train as usual and say which checks failed in the reply's metrics (recorded in metrics.jsonl)


NO_DEFENSE, SECURE_AGGREGATION, SECURE_AGGREGATION_EMULATED = "none", "secagg", "secagg-emulated"
INSPECT = "inspect"
DPSGD, LOCAL_DP = "dpsgd", "ldp"  # DP-SGD in the client's training (Opacus); Flower's LocalDpMod on its reply
DEFENSE_KINDS = (NO_DEFENSE, "noise:SIGMA", "clip:C", "prune:P", "fp16", "dpsgd:noise=Z:clip=C:delta=D",
                 "ldp:clip=C:eps=E:delta=D", SECURE_AGGREGATION, SECURE_AGGREGATION_EMULATED,
                 f"{INSPECT}[:{'|'.join(InspectionMode)}]")
# kind -> (what its number means, the check it must pass); None: the kind takes no number.
DEFENSE_NUMBERS = {
    DefenseKind.NOISE: ("SIGMA, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.CLIP: ("C, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.PRUNE: ("P, a fraction in [0, 1) (1 would send no update)", lambda value: 0 <= value < 1),
    DefenseKind.FP16: None,
}
DEFAULT_DELTA = 1e-5


def _positive(value: float) -> bool:
    return 0 < value < math.inf


def _probability(value: float) -> bool:
    return 0 < value < 1


def parse_named_numbers(what: str, text: str, example: str,
                        keys: Mapping[str, tuple[str, typing.Callable[[float], bool], float | None]]
                        ) -> dict[str, float]:
    """'noise=1:clip=2' -> {'noise': 1.0, 'clip': 2.0} for a setting written KEY=NUMBER joined by ':'.

    `keys`: name -> (what it must be, its check, its default or None when it must be given). ':' and not ','
    joins them because a sweep's --grid separates its values with commas. `what` and `example` name the
    setting in the one-sentence ConfigError.
    """
    if "," in text:
        raise ConfigError(f"{what}: join the settings with ':', not ',' (commas separate a sweep's values), "
                          f"e.g. {example}")
    found: dict[str, float] = {}
    for item in filter(None, text.split(":")):
        key, equals, number = item.partition("=")
        if not equals or key not in keys:
            raise ConfigError(f"{what}: {item!r} is not one of {', '.join(f'{k}=...' for k in keys)}; "
                              f"e.g. {example}")
        if key in found:
            raise ConfigError(f"{what}: {key} is given twice")
        meaning, valid, _ = keys[key]
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not valid(value):
            raise ConfigError(f"{what}: {key} must be {meaning}, got {number!r}")
        found[key] = value
    for key, (meaning, _, default) in keys.items():
        if key not in found:
            if default is None:
                raise ConfigError(f"{what}: {key}= is missing ({meaning}); e.g. {example}")
            found[key] = default
    return found


@dataclass(frozen=True)
class DpSgd:
    """DP-SGD in the client's local training (clients/training.py, with Opacus): every example's gradient is
    clipped to L2 norm `clip`, the batch's sum gets Gaussian noise of standard deviation `noise` x `clip`, and
    Opacus' RDP accountant turns the steps into epsilon at `delta` (clients/privacy.py)."""

    noise: float
    clip: float = 1.0
    delta: float = DEFAULT_DELTA

    EXAMPLE: typing.ClassVar[str] = "dpsgd:noise=1.0:clip=1.0:delta=1e-5"

    @classmethod
    def parse(cls, text: str, spec: str) -> "DpSgd":
        values = parse_named_numbers(f"--defense {spec!r}: dpsgd", text, cls.EXAMPLE, {
            "noise": ("the noise multiplier Z, a positive number", _positive, None),
            "clip": ("the per-example clipping norm C, a positive number", _positive, 1.0),
            "delta": ("a probability in (0, 1)", _probability, DEFAULT_DELTA)})
        return cls(values["noise"], values["clip"], values["delta"])

    def __str__(self) -> str:
        return f"{DPSGD}:noise={self.noise:g}:clip={self.clip:g}:delta={self.delta:g}"


@dataclass(frozen=True)
class LocalDp:
    """Flower's LocalDpMod (flwr.clientapp.mod) on the client's reply: the update clipped to L2 norm `clip`,
    then Gaussian noise calibrated to (`epsilon`, `delta`) with sensitivity `clip` (clients/mods.py)."""

    clip: float
    epsilon: float
    delta: float = DEFAULT_DELTA

    EXAMPLE: typing.ClassVar[str] = "ldp:clip=1.0:eps=8:delta=1e-5"

    @classmethod
    def parse(cls, text: str, spec: str) -> "LocalDp":
        values = parse_named_numbers(f"--defense {spec!r}: ldp", text, cls.EXAMPLE, {
            "clip": ("the update's clipping norm C, a positive number", _positive, None),
            "eps": ("the budget epsilon of one update, a positive number", _positive, None),
            "delta": ("a probability in (0, 1)", _probability, DEFAULT_DELTA)})
        return cls(values["clip"], values["eps"], values["delta"])

    @property
    def noise_std(self) -> float:
        """The noise LocalDpMod adds to every entry: the Gaussian mechanism's sigma for sensitivity `clip`."""
        return self.clip * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon

    def __str__(self) -> str:
        return f"{LOCAL_DP}:clip={self.clip:g}:eps={self.epsilon:g}:delta={self.delta:g}"


@dataclass(frozen=True)
class DefenseSpec:
    """A parsed --defense: the client's steps in order (clients/defenses.py), DP-SGD in its training (`dpsgd`),
    Flower's LocalDpMod after the steps (`local_dp`); whether the server sees only the sum of the updates (secure
    aggregation): through Flower's SecAgg+ protocol (`secagg`, fl_sim/server/secagg.py), or, with `emulated`
    (`secagg-emulated`), by averaging the replies itself, which is faster at many clients but shows neither the
    protocol's quantization nor its dropouts; and whether clients inspect the model they are sent before
    training, refusing it or flagging it when it fails (`inspect`, clients/inspection.py; None: no)."""

    steps: tuple[tuple[DefenseKind, float | None], ...] = ()
    secure_aggregation: bool = False
    emulated: bool = False
    inspection: InspectionMode | None = None
    dpsgd: DpSgd | None = None
    local_dp: LocalDp | None = None

    @property
    def protocol(self) -> bool:
        """Whether the run goes through Flower's real SecAgg+ (not the emulation)."""
        return self.secure_aggregation and not self.emulated

    @classmethod
    def parse(cls, text: str) -> "DefenseSpec":
        """'clip:4+noise:0.01' -> DefenseSpec; anything else gets a ConfigError saying what is wrong."""
        if text.strip() == NO_DEFENSE:
            return cls()
        steps: list[tuple[DefenseKind, float | None]] = []
        secure = emulated = False
        inspection: InspectionMode | None = None
        dpsgd: DpSgd | None = None
        local_dp: LocalDp | None = None
        for part in (part.strip() for part in text.split("+")):
            kind, colon, number = part.partition(":")
            if kind == INSPECT:
                if inspection is not None or (colon and number not in set(InspectionMode)):
                    raise ConfigError(f"--defense {text!r}: inspect comes once, as inspect (refuse) or "
                                      f"inspect:{' or inspect:'.join(InspectionMode)}")
                inspection = InspectionMode(number) if colon else InspectionMode.REFUSE
                continue
            if kind in (SECURE_AGGREGATION, SECURE_AGGREGATION_EMULATED):
                if colon or secure:
                    raise ConfigError(f"--defense {text!r}: {kind} takes no number, and secure aggregation "
                                      f"({SECURE_AGGREGATION} or {SECURE_AGGREGATION_EMULATED}) comes once")
                secure, emulated = True, kind == SECURE_AGGREGATION_EMULATED
                continue
            if kind == DPSGD:
                if dpsgd is not None:
                    raise ConfigError(f"--defense {text!r}: dpsgd comes once")
                dpsgd = DpSgd.parse(number, text)
                continue
            if kind == LOCAL_DP:
                if local_dp is not None:
                    raise ConfigError(f"--defense {text!r}: ldp comes once")
                local_dp = LocalDp.parse(number, text)
                continue
            if local_dp is not None:  # LocalDpMod is a mod around the steps: it acts on what they leave
                raise ConfigError(f"--defense {text!r}: ldp (Flower's LocalDpMod) acts last, on what the other "
                                  f"steps send: write it after them")
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
        return cls(tuple(steps), secure, emulated, inspection, dpsgd, local_dp)

    def __str__(self) -> str:
        parts = [f"{INSPECT}:{self.inspection}"] if self.inspection is not None else []
        parts += [str(self.dpsgd)] if self.dpsgd else []
        parts += [kind if value is None else f"{kind}:{value:g}" for kind, value in self.steps]
        parts += [str(self.local_dp)] if self.local_dp else []
        if self.secure_aggregation:
            parts.append(SECURE_AGGREGATION_EMULATED if self.emulated else SECURE_AGGREGATION)
        return "+".join(parts) or NO_DEFENSE

    @property
    def client_mods(self) -> bool:
        """Whether anything acts on the client's reply (a hand-written step or Flower's LocalDpMod)."""
        return bool(self.steps) or self.local_dp is not None


class ServerDpSide(StrEnum):
    """Where Flower's central DP wrapper has the updates clipped (fl_sim/server/strategy.py `flower_strategy`)."""

    SERVER = "server"  # DifferentialPrivacyServerSideFixedClipping: the server clips every reply, then noises the sum
    CLIENT = "client"  # DifferentialPrivacyClientSideFixedClipping: Flower's fixedclipping_mod clips on the client


@dataclass(frozen=True)
class ServerDp:
    """A parsed --server-dp: Flower's central DP wrapper around the strategy (None side: off). The server
    adds Gaussian noise of standard deviation `noise` x `clip` / (clients sampled) to the aggregate, after
    clipping each update to `clip` itself or having the clients clip theirs."""

    side: ServerDpSide | None = None
    noise: float = 0.0
    clip: float = 0.0

    EXAMPLE: typing.ClassVar[str] = "server:noise=1.0:clip=1.0"

    @classmethod
    def parse(cls, text: str) -> "ServerDp":
        text = text.strip()
        if text == NO_DEFENSE:
            return cls()
        side, _, rest = text.partition(":")
        if side not in set(ServerDpSide):
            raise ConfigError(f"--server-dp {text!r}: write none, or server: or client: (who clips) and the "
                              f"settings, e.g. {cls.EXAMPLE} or client:noise=1.0:clip=1.0")
        values = parse_named_numbers(f"--server-dp {text!r}", rest, cls.EXAMPLE, {
            "noise": ("the noise multiplier Z, a non-negative number", lambda value: 0 <= value < math.inf, None),
            "clip": ("the update's clipping norm C, a positive number", _positive, None)})
        return cls(ServerDpSide(side), values["noise"], values["clip"])

    def __str__(self) -> str:
        return NO_DEFENSE if self.side is None else f"{self.side}:noise={self.noise:g}:clip={self.clip:g}"


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


class Group(StrEnum):
    """Where a setting's flag is listed in a command's --help (its argparse group)."""

    DATA = "data and model"
    TRAINING = "client training (what the server configures)"
    ATTACK = "attack"
    FEDERATION = "federation"
    FAULTS = "faults and interruptions"
    DEFENSE = "secure aggregation (Flower's SecAgg+, --defense secagg)"
    GENERAL = "general"  # the command's own top-level flags (--out, --seed)


T = typing.TypeVar("T")
SETTING = "setting"  # the key of a RunConfig field's metadata that holds its Setting


@dataclass(frozen=True)
class Setting:
    """What a RunConfig field declares besides its type and default: its flag, its bounds, its Flower key.

    fl_sim/commands/config.py builds each field's flag from this (`--name-with-hyphens`, argparse `type` from
    the annotation, help, group), RunConfig.check applies the bounds, and from_flower/to_flower use
    `flower_key`. `help` may say `%(default)s`: argparse fills in the default of the command that shows it
    (sweeps and `fl-sim attack` default to a different model and training than `fl-sim run`). The training
    settings' bounds are TrainingSettings' (fl_sim/contract/protocol.py): the client checks them too.
    """

    help: str
    group: Group
    least: float | None = None  # the value must be at least this (a None value of an optional field is not checked)
    above: float | None = None  # the value must be greater than this ...
    most: float | None = None  # ... and at most this
    choices: bool = False  # argparse refuses a value outside the field's enum (else RunConfig does, in one sentence)
    negatable: bool = False  # a bool flag with a --no- form too
    metavar: str | None = None
    flag_default: str | None = None  # the flag's default where the field's does not read as a flag value
    given: bool = False  # the command line has no default for it: the command names it (the field's is Flower's)
    flower_key: str | None = None  # Flower's run-config key where it is not the field's name with hyphens
    resumable: bool = False  # where and with what a run computes, not what: `fl-sim run --resume` may change it

    def violation(self, flag: str, value: float) -> str | None:
        """The sentence saying how `value` breaks this setting's bounds, or None when it keeps them."""
        if self.least is not None and not value >= self.least:
            return f"{flag} must be at least {self.least}, got {value}"
        if self.above is not None and self.most is not None and not self.above < value <= self.most:
            return f"{flag} must be in ({self.above}, {self.most}], got {value}"
        if self.above == 0 and not value > 0:
            return f"{flag} must be positive, got {value}"
        if self.above is not None and not value > self.above:
            return f"{flag} must be greater than {self.above}, got {value}"
        return None


def setting(default: T, declared: Setting) -> T:
    """A RunConfig field with its default and its declaration."""
    return field(default=default, metadata={SETTING: declared})


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one federated run, each declared once: its type, default and `Setting` (help, bounds).

    Field names are the argparse names of `fl-sim run`; Flower's keys are the same with hyphens (two
    differ: Setting.flower_key). Built directly, from flags or from Flower's run config, every value is
    coerced to its field's type (__post_init__), so a RunConfig is always typed. The order of the fields
    is the order of their flags in --help, of the keys in run.json and in pyproject.toml.
    """

    out: str = setting("out/flwr-run", Setting("output folder", Group.GENERAL, given=True, flower_key="out-dir"))
    rounds: int = setting(3, Setting("federated rounds", Group.FEDERATION, least=1, flower_key="num-server-rounds"))
    num_clients: int = setting(2, Setting("clients, one per partition", Group.FEDERATION, least=1))
    dataset: DatasetName = setting(DatasetName.MNIST, Setting(
        f"one of {', '.join(DatasetName)} (default %(default)s)", Group.DATA))
    data_root: str | None = setting(None, Setting(  # None: $FL_SIM_DATA, else ./data
        "folder holding the data (default $FL_SIM_DATA, else ./data)", Group.DATA, resumable=True))
    # a ReLU ConvNet, as federations train (DLG's sigmoid LeNet hardly learns: --model lenet)
    model: ModelName = setting(ModelName.CNN, Setting(f"one of {', '.join(ModelName)} (default %(default)s)",
                                                      Group.DATA))
    init: str = setting("default", Setting(
        "'default' (PyTorch's, seeded), 'paper' (U(-0.5, 0.5), as DLG) or a checkpoint path", Group.DATA))
    partition: PartitionScheme = setting(PartitionScheme.IID, Setting(
        "how the training set is split: iid, or dirichlet (label skew, see --alpha)", Group.FEDERATION, choices=True))
    alpha: float = setting(0.5, Setting("Dirichlet concentration: small = each client sees few classes",
                                        Group.FEDERATION, above=0))
    # with max_shard: each client keeps a seeded number of its partition's examples in between
    min_shard: int = setting(48, Setting("with --max-shard: the fewest examples a client keeps of its partition",
                                        Group.FEDERATION, least=1))
    max_shard: int = setting(64, Setting(  # 0: every client keeps its whole partition
        "each client keeps a seeded number of its partition's examples, from --min-shard to this (unequal shards; "
        "default %(default)s); 0: its whole partition", Group.FEDERATION, least=0))
    fraction_train: float = setting(1.0, Setting(  # the share of clients Flower samples each round
        "the share of clients Flower samples for each round (default %(default)g: all)", Group.FEDERATION,
        above=0, most=1))
    strategy: StrategyName = setting(StrategyName.FEDAVG, Setting(
        "the Flower strategy the malicious server wraps (default %(default)s)", Group.FEDERATION, choices=True))
    proximal_mu: float = setting(0.0, Setting(  # FedProx's mu (strategy fedprox only)
        "FedProx's proximal weight mu (with --strategy fedprox)", Group.FEDERATION))
    server_lr: float = setting(0.01, Setting(  # FedAdam's / FedYogi's server learning rate (eta)
        "the server optimiser's learning rate eta (with --strategy fedadam or fedyogi)", Group.FEDERATION, above=0))
    train_mode: TrainMode = setting(TrainMode.EPOCHS, Setting(
        "fedsgd: one step on B examples; steps: K steps of B examples drawn each round; epochs: E epochs over the "
        "client's whole shard in shuffled batches of B (default %(default)s)", Group.TRAINING, choices=True))
    local_steps: int = setting(1, Setting("K SGD steps per round (steps mode)", Group.TRAINING))
    batch_size: int = setting(16, Setting("B examples per step (default %(default)s)", Group.TRAINING))
    epochs: int = setting(1, Setting(
        "E passes over the shard (epochs mode) or over the K x B round examples (steps mode)", Group.TRAINING))
    lr: float = setting(0.05, Setting("client learning rate", Group.TRAINING))
    momentum: float = setting(0.9, Setting("client SGD momentum", Group.TRAINING))
    weight_decay: float = setting(0.0, Setting("client SGD weight decay", Group.TRAINING))
    batchnorm: BatchNormMode = setting(BatchNormMode.TRAIN, Setting(
        "batch-norm layers in local training: batch statistics (train, default) or the model's running ones, not "
        "updated (frozen)", Group.TRAINING, choices=True))
    defense: DefenseSpec = setting(DefenseSpec(), Setting(
        f"what clients do to their update before sending it: {', '.join(DEFENSE_KINDS)}, or steps joined by '+', "
        "e.g. clip:4+noise:0.01 (see clients/defenses.py); dpsgd and ldp use Opacus' and Flower's code, e.g. "
        f"{DpSgd.EXAMPLE} or {LocalDp.EXAMPLE}; inspect: clients check the model they are sent and "
        "refuse it (inspect:flag: train and flag it) when it fails (clients/inspection.py)", Group.TRAINING,
        metavar="SPEC"))
    secagg_shares: float = setting(3.0, Setting(  # SecAggPlusWorkflow's num_shares
        "SecAgg+: shares each client's secrets are split into, among its neighbours: a count above 2, or a "
        "fraction (at most 1) of the round's clients (default %(default)s, Flower's example)", Group.DEFENSE,
        above=0))
    secagg_threshold: float = setting(2.0, Setting(  # SecAggPlusWorkflow's reconstruction_threshold
        "SecAgg+: shares that rebuild a secret (a dropped client's mask): a count below --secagg-shares, or a "
        "fraction (at most 1) of the shares (default %(default)s)", Group.DEFENSE, above=0))
    secagg_clipping_range: float = setting(8.0, Setting(
        "SecAgg+: each client's example-weighted parameters are clipped to +-this before quantization "
        "(default %(default)s, Flower's)", Group.DEFENSE, above=0))
    secagg_quantization_range: int = setting(2**22, Setting(
        "SecAgg+: quantization levels over the clipping range (default %(default)s = 2^22, Flower's; below "
        "2^32 / clients a round, the masks' modulus)", Group.DEFENSE, above=1, most=SECAGG_MODULUS - 1))
    secagg_max_weight: float = setting(1000.0, Setting(
        "SecAgg+: the largest example count a client may weigh in with; weights are num-examples / this, "
        "so a smaller one quantizes finer (default %(default)s, Flower's)", Group.DEFENSE, above=0))
    secagg_timeout: float = setting(0.0, Setting(  # 0: wait for every reply (a simulation's crash is a reply)
        "SecAgg+: seconds each of the protocol's four stages waits for replies; a client that misses it has "
        "dropped out (default 0: wait for all)", Group.DEFENSE, least=0))
    server_dp: ServerDp = setting(ServerDp(), Setting(
        f"Flower's central DP wrapper around the strategy: none (default), {ServerDp.EXAMPLE} (the server clips "
        "and noises) or client:noise=Z:clip=C (Flower's fixedclipping_mod clips on the clients); the attack reads "
        "the replies before it, as a malicious server would", Group.FEDERATION, metavar="SPEC"))
    attack: str = "imprint"  # its flag is written by hand in fl_sim/commands/config.py (the attack registry's names)
    iterations: int = setting(300, Setting(
        "optimiser iterations per victim (an L-BFGS iteration is up to 20 updates, as in DLG)", Group.ATTACK,
        least=1))
    restarts: int | None = setting(None, Setting(  # None: the attack preset's
        "random restarts per victim (default: the preset's)", Group.ATTACK, least=1))
    label_deals: int | None = setting(None, Setting(  # None: the attack preset's
        "several steps a round: ways of dealing the recovered labels into the steps, each optimised as its own row "
        "and the best kept (default: the preset's, 8; the FedAvg attack's epoch copies take one deal each)",
        Group.ATTACK, least=1))
    bn_statistics: float = setting(0.0, Setting(  # weight of the batch-norm statistics term (GradInversion); 0: off
        "weight of a term matching the batch-norm running statistics the client sent to those the replay produces "
        "(GradInversion; 0: off, default; see docs/findings.md section 6)", Group.ATTACK, least=0, metavar="WEIGHT"))
    tv_weight: float | None = setting(None, Setting(  # None: the attack preset's
        "weight of the total-variation image prior (default: the preset's; ig and fedavg 0.01, dlg and idlg 0); the "
        "best weight depends on the model (docs/benchmarks.md)", Group.ATTACK, least=0, metavar="WEIGHT"))
    no_replay: bool = setting(False, Setting(
        "treat the weight change / (steps x lr) as one gradient instead of replaying K steps", Group.ATTACK))
    max_attack_images: int = setting(64, Setting(  # an update of more images (epochs mode: a larger shard)
        "updates of more images (in epochs mode: larger shards) are not attacked; their row says so",
        Group.FEDERATION, least=1))
    attack_async: bool = setting(False, Setting(  # beside the next round's training (fl_sim/server/background.py)
        "run a passive attack (dlg, idlg, ig, fedavg) on a background thread beside the next round's training instead "
        "of before the aggregate: the same rows; not with imprint or trap (default: off)", Group.FEDERATION,
        negatable=True, resumable=True))
    attack_every: int = setting(1, Setting("attack rounds 1, 1+N, 1+2N, ... (default every round)", Group.FEDERATION,
                                           least=1))
    attack_clients: tuple[int, ...] | None = setting(None, Setting(  # None: every client
        "partition ids to attack, e.g. 0,2 (default all)", Group.FEDERATION, flag_default="all"))
    imprint_bins: int = setting(0, Setting(  # 0: 256 with --attack imprint
        "rows of the imprint block the clients build (default 256 with --attack imprint)", Group.ATTACK, least=0))
    imprint_blocks: int = setting(4, Setting(  # the server's choice only
        "statistics the imprint rows measure; more blocks, fewer images sharing every bin (default %(default)s)",
        Group.ATTACK, least=1))
    client_eval: bool = setting(False, Setting(
        "also have clients evaluate the global model on their share of the test split", Group.FEDERATION))
    device: str = setting(Device.AUTO, Setting(f"{', '.join(Device)}", Group.ATTACK, resumable=True))
    seed: int = setting(0, Setting("seed of the run's random draws (default %(default)s)", Group.GENERAL, least=0))
    inject_faults: dict[int, Fault] = field(default_factory=dict, metadata={SETTING: Setting(  # partition id -> fault
        f"clients that send bad replies every round, e.g. 0=nan,2=crash; kinds: {', '.join(FAULT_HELP)}",
        Group.FAULTS, metavar="CLIENT=KIND,...")})

    def __post_init__(self):
        for spec in fields(self):
            object.__setattr__(self, spec.name, coerce(spec.name, getattr(self, spec.name)))

    @classmethod
    def from_values(cls, values: Mapping[str, object], defaults: "RunConfig | None" = None) -> "RunConfig":
        """Field name -> value (e.g. the flags a user gave) over `defaults`; unknown names are errors."""
        unknown = sorted(set(values) - {spec.name for spec in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}")
        raw: dict[str, typing.Any] = dict(values)  # untyped as given: __post_init__ coerces each to its field's type
        return dataclasses.replace(defaults or cls(), **raw)

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
        return {flower_key(spec.name): to_text(getattr(self, spec.name)) if spec.name not in OPTIONAL_COUNTS
                else (getattr(self, spec.name) or 0) for spec in fields(self)}

    @property
    def imprint_rows(self) -> int:
        """The imprint block's rows in the architecture every client builds (0: no block)."""
        spec = find_attack(self.attack)  # None in a process that has not registered the attack (a test's, in Ray)
        return self.imprint_bins or (IMPRINT_BINS if spec is not None and spec.needs_imprint else 0)

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
        if self.attack not in (*attack_names(), NO_ATTACK):
            known = ", ".join((*attack_names(), NO_ATTACK))
            raise ConfigError(f"unknown attack {self.attack!r}: choose one of {known}")
        if self.device not in set(Device) and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be {', '.join(Device)} (or cuda:N), got {self.device!r}")
        for name, declared in SETTINGS.items():  # the bounds each setting declares
            value = getattr(self, name)
            problem = None if value is None else declared.violation(flag_of(name), value)
            if problem:
                raise ConfigError(problem)
        spec = find_attack(self.attack)
        if spec is not None and spec.models is not None and not spec.reaches(self.model):
            others = [other.name for other in attack_specs() if other.active and other.reaches(self.model)]
            raise ConfigError(f"{spec.name} reaches only {', '.join(spec.models)} ({spec.models_reason}), not "
                              f"{self.model}: use --attack {' or '.join(others) or 'with another model'} for it "
                              f"(docs/threat-models.md)")
        if spec is not None and spec.needs_imprint and self.imprint_rows % self.imprint_blocks:
            raise ConfigError(f"--imprint-bins {self.imprint_rows} must split evenly into --imprint-blocks "
                              f"{self.imprint_blocks}")
        if self.attack_async and spec is not None and not spec.may_run_async:
            background = [other.name for other in attack_specs() if other.may_run_async]
            raise ConfigError(f"--attack-async runs only passive attacks ({', '.join(background)}) in the "
                              f"background: {self.attack} arms the weights the server sends and decides what of "
                              f"its targets' replies enters the average, so it is part of the round; drop "
                              f"--attack-async or choose a passive attack")
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
        self.check_privacy()
        if self.attack_clients is not None and self.defense.secure_aggregation:
            raise ConfigError("--attack-clients cannot pick clients under secure aggregation: the server "
                              "sees only their sum, so leave it out")
        if self.defense.protocol:
            self.check_secagg()

    def check_secagg(self) -> None:
        """What Flower's SecAggPlusWorkflow would refuse, or could not run, said before Ray starts."""
        shares, threshold = self.secagg_shares, self.secagg_threshold
        if self.num_clients < 2:
            raise ConfigError("--defense secagg needs at least 2 clients a round (SecAgg+ sums several clients' "
                              "masked updates)")
        if shares > 1 and (not shares.is_integer() or shares <= 2):
            raise ConfigError(f"--secagg-shares must be a count above 2 or a fraction up to 1, got {shares:g}")
        if threshold > 1 and not threshold.is_integer():
            raise ConfigError(f"--secagg-threshold must be a count or a fraction up to 1, got {threshold:g}")
        if threshold > 1 and shares > 1 and threshold >= shares:
            raise ConfigError(f"--secagg-threshold {threshold:g} must be below --secagg-shares {shares:g}")
        per_round = math.ceil(self.num_clients * self.fraction_train)
        if per_round * self.secagg_quantization_range >= SECAGG_MODULUS:
            raise ConfigError(f"--secagg-quantization-range {self.secagg_quantization_range} x {per_round} clients a "
                              f"round overflows SecAgg+'s modulus 2^32 (the sum would wrap around): use at most "
                              f"{(SECAGG_MODULUS - 1) // per_round} levels")


    def check_privacy(self) -> None:
        """The models and settings DP-SGD can work with (Opacus' per-example gradients).

        Flower's LocalDpMod and central DP wrappers run on any model; on one with batch norm they also clip and
        noise its running statistics (clients/mods.py)."""
        if self.defense.dpsgd and self.model not in MODELS_WITHOUT_BATCHNORM:
            raise ConfigError(f"--defense dpsgd needs every example's own gradient, which Opacus cannot compute "
                              f"through {self.model}'s batch norm (it mixes the examples of a batch): use --model "
                              f"{', '.join(MODELS_WITHOUT_BATCHNORM)}")
        if self.defense.dpsgd and self.proximal_mu:
            raise ConfigError("--defense dpsgd clips and noises the examples' gradients only; FedProx's proximal "
                              "term would bypass them: drop --proximal-mu or dpsgd")


# The models with no batch norm: Opacus computes their per-example gradients (tests/test_dp.py checks the list
# against the models).
MODELS_WITHOUT_BATCHNORM = (ModelName.LENET, ModelName.CNN, ModelName.MLP)
FIELD_TYPES = typing.get_type_hints(RunConfig)
# counts whose None means the attack preset's (restarts, label deals): Flower's run config has no null, so
# `to_flower` writes their None as 0 and `coerce` reads a count's 0 back as None
OPTIONAL_COUNTS = tuple(name for name, kind in FIELD_TYPES.items() if kind == int | None)
SETTINGS: dict[str, Setting] = {spec.name: spec.metadata[SETTING] for spec in fields(RunConfig)
                                if SETTING in spec.metadata}


def flag_of(name: str) -> str:
    """Field `name`'s command-line flag: `--name-with-hyphens`."""
    return f"--{name.replace('_', '-')}"


def flower_key(name: str) -> str:
    """Field `name`'s key in Flower's run config: its declared `flower_key`, else the name with hyphens."""
    declared = SETTINGS.get(name)
    if declared is not None and declared.flower_key is not None:
        return declared.flower_key
    return name.replace("_", "-")


def coerce(name: str, value: object) -> object:
    """`value` as field `name`'s type, or a ConfigError naming the flag and what it must be."""
    kind = FIELD_TYPES[name]
    flag = flag_of(name)
    if name == "attack_clients":
        if value is None or isinstance(value, str):
            return None if value is None else parse_client_list(value)
        if not isinstance(value, Iterable):
            raise ConfigError(f"{flag} must be partition ids like 0,2,5 (or all), got {value!r}")
        return tuple(sorted({typing.cast(int, coerce_scalar(int, v, flag)) for v in value}))
    if name == "inject_faults":
        if isinstance(value, Mapping):
            value = ",".join(f"{client}={fault}" for client, fault in value.items())
        return parse_faults(typing.cast(str, coerce_scalar(str, value, flag)))
    if name == "defense":
        if isinstance(value, DefenseSpec):
            return value
        return DefenseSpec.parse(typing.cast(str, coerce_scalar(str, value, flag)))
    if name == "server_dp":
        if isinstance(value, ServerDp):
            return value
        return ServerDp.parse(typing.cast(str, coerce_scalar(str, value, flag)))
    # `X | None`: TOML has no null: "" (and 0 for a count) mean None
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
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
    if isinstance(kind, type) and issubclass(kind, Name):
        if not isinstance(value, str):
            raise ConfigError(f"{flag} must be text, got {value!r}")
        if value not in set(kind):
            raise ConfigError(f"unknown {flag[2:]} {value!r}: choose one of {', '.join(kind)}")
        return kind(value)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        if isinstance(value, str) and value in set(kind):
            return kind(value)
        raise ConfigError(f"{flag} must be one of {', '.join(kind)}, got {value!r}")
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
    if isinstance(value, (StrEnum, DefenseSpec, ServerDp)):
        return str(value)
    return value


def trap_starves(attack: str, attack_clients: tuple[int, ...] | None) -> bool:
    """An attack that keeps nothing of its targets' replies (trap weights), on every client, leaves nothing to
    average (docs/threat-models.md)."""
    spec = find_attack(attack)
    return spec is not None and not spec.averages_targets and attack_clients is None


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
