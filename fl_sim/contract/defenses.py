"""The `--defense` and `--server-dp` grammar: what a client does to its update, and the server's central DP.

`DefenseSpec.parse` reads `--defense` (steps joined by '+': noise, clip, prune, fp16, DP-SGD, Flower's
LocalDpMod, secure aggregation, inspection, the detectors of fl_sim/contract/detectors.py) into one typed value;
`ServerDp.parse` reads `--server-dp`. The steps' code is keyed by `DefenseKind` in clients/defenses.py (`STEPS`);
the checks of a defense against the rest of the run (`check_privacy`, `check_secagg`) live here beside it.
Standard library only.
"""
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from fl_sim.contract.detectors import detector_names
from fl_sim.contract.models import ModelTrait, model_spec, model_specs
from fl_sim.contract.setting import ConfigError, positive

SECAGG_MODULUS = 2**32  # SecAgg+'s masks are drawn modulo this (Flower's default modulus_range, kept)


class DefenseKind(StrEnum):
    """A step a client applies to its update (clients/defenses.py `STEPS` does each)."""

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
                 f"{INSPECT}[:{'|'.join(InspectionMode)}]",
                 f"{'|'.join(detector_names())}[:{'|'.join(InspectionMode)}]")
# kind -> (what its number means, the check it must pass); None: the kind takes no number.
DEFENSE_NUMBERS = {
    DefenseKind.NOISE: ("SIGMA, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.CLIP: ("C, a positive number", lambda value: 0 < value < math.inf),
    DefenseKind.PRUNE: ("P, a fraction in [0, 1) (1 would send no update)", lambda value: 0 <= value < 1),
    DefenseKind.FP16: None,
}
DEFAULT_DELTA = 1e-5


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
            "noise": ("the noise multiplier Z, a positive number", positive, None),
            "clip": ("the per-example clipping norm C, a positive number", positive, 1.0),
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
            "clip": ("the update's clipping norm C, a positive number", positive, None),
            "eps": ("the budget epsilon of one update, a positive number", positive, None),
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
    training, refusing it or flagging it when it fails (`inspect`, clients/inspection.py; None: no); and the
    other detectors each client runs on the model it is sent, each refusing or flagging (`detectors`: (name,
    mode) in the order written; fl_sim/contract/detectors.py, clients/detectors/)."""

    steps: tuple[tuple[DefenseKind, float | None], ...] = ()
    secure_aggregation: bool = False
    emulated: bool = False
    inspection: InspectionMode | None = None
    dpsgd: DpSgd | None = None
    local_dp: LocalDp | None = None
    detectors: tuple[tuple[str, InspectionMode], ...] = ()

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
        detectors: list[tuple[str, InspectionMode]] = []
        for part in (part.strip() for part in text.split("+")):
            kind, colon, number = part.partition(":")
            if kind in detector_names():
                if kind in dict(detectors) or (colon and number not in set(InspectionMode)):
                    raise ConfigError(f"--defense {text!r}: {kind} comes once, as {kind} (refuse) or "
                                      f"{kind}:{f' or {kind}:'.join(InspectionMode)}")
                detectors.append((kind, InspectionMode(number) if colon else InspectionMode.REFUSE))
                continue
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
        return cls(tuple(steps), secure, emulated, inspection, dpsgd, local_dp, tuple(detectors))

    def __str__(self) -> str:
        parts = [f"{INSPECT}:{self.inspection}"] if self.inspection is not None else []
        parts += [f"{name}:{mode}" for name, mode in self.detectors]
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
            "clip": ("the update's clipping norm C, a positive number", positive, None)})
        return cls(ServerDpSide(side), values["noise"], values["clip"])

    def __str__(self) -> str:
        return NO_DEFENSE if self.side is None else f"{self.side}:noise={self.noise:g}:clip={self.clip:g}"


def check_privacy(defense: DefenseSpec, model: str, proximal_mu: float) -> None:
    """The models and settings DP-SGD can work with (Opacus' per-example gradients); raises ConfigError.

    Flower's LocalDpMod and central DP wrappers run on any model; on one with batch norm they also clip and
    noise its running statistics (clients/mods.py).

    Parameters
    ----------
    defense : DefenseSpec
        The run's --defense.
    model : str
        A registered model's name.
    proximal_mu : float
        FedProx's proximal weight (0: none).
    """
    if defense.dpsgd and model_spec(model).batchnorm:
        plain = [spec.name for spec in model_specs() if not spec.batchnorm]
        raise ConfigError(f"--defense dpsgd needs every example's own gradient, which Opacus cannot compute "
                          f"through {model}'s {ModelTrait.BATCH_NORM} (it mixes the examples of a batch): use "
                          f"--model {', '.join(plain)}")
    if defense.dpsgd and proximal_mu:
        raise ConfigError("--defense dpsgd clips and noises the examples' gradients only; FedProx's proximal "
                          "term would bypass them: drop --proximal-mu or dpsgd")


def check_secagg(num_clients: int, fraction_train: float, shares: float, threshold: float,
                 quantization_range: int) -> None:
    """What Flower's SecAggPlusWorkflow would refuse, or could not run, said before Ray starts (ConfigError).

    Parameters
    ----------
    num_clients, fraction_train : int, float
        The federation: its clients and the share of them sampled each round.
    shares, threshold, quantization_range : float, float, int
        --secagg-shares, --secagg-threshold and --secagg-quantization-range.
    """
    if num_clients < 2:
        raise ConfigError("--defense secagg needs at least 2 clients a round (SecAgg+ sums several clients' "
                          "masked updates)")
    if shares > 1 and (not shares.is_integer() or shares <= 2):
        raise ConfigError(f"--secagg-shares must be a count above 2 or a fraction up to 1, got {shares:g}")
    if threshold > 1 and not threshold.is_integer():
        raise ConfigError(f"--secagg-threshold must be a count or a fraction up to 1, got {threshold:g}")
    if threshold > 1 and shares > 1 and threshold >= shares:
        raise ConfigError(f"--secagg-threshold {threshold:g} must be below --secagg-shares {shares:g}")
    per_round = math.ceil(num_clients * fraction_train)
    if per_round * quantization_range >= SECAGG_MODULUS:
        raise ConfigError(f"--secagg-quantization-range {quantization_range} x {per_round} clients a round "
                          f"overflows SecAgg+'s modulus 2^32 (the sum would wrap around): use at most "
                          f"{(SECAGG_MODULUS - 1) // per_round} levels")
