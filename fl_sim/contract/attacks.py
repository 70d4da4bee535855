"""The attack registry: every attack the server may run, by name, with what the rest of the program must know of it.

One `AttackSpec` per attack says what is otherwise scattered over flags, checks and help texts: passive or
active, whether `--attack-async` may run it, the models it reaches, whether the clients' architecture needs the
imprint block, the run settings it reads, and where its implementation lives. The implementation (a subclass of
`fl_sim.server.attacks.Attack`) is named by an import path and imported only when the attack is built, so this
module, like the rest of the contract, imports nothing but the standard library: `fl-sim --help`, `fl-sim report`
and the run config's checks read the registry without torch or Flower.

A new attack is one class implementing `Attack` and one `register(AttackSpec(...))` (docs/architecture.md).
"""
from dataclasses import dataclass
from enum import StrEnum


class AttackKind(StrEnum):
    """What the server does beyond reading updates."""

    PASSIVE = "passive"  # honest-but-curious: sends the global model, changes nothing in the average
    ACTIVE = "active"  # a malicious server: sends its targets weights (or an architecture) of its own choosing


@dataclass(frozen=True)
class AttackSpec:
    """One registry entry: an attack's name, its traits, and the class that implements it.

    `factory` is "module:Class", a subclass of fl_sim.server.attacks.Attack, imported when the attack is
    built (never by this module). `models`: the models it can attack (None: every model); `models_reason`
    says why the others are out of reach. `needs_imprint`: the clients build the imprint block in front of
    the model (fl_sim/learning/models/imprint.py). `averages_targets`: whether anything of a target's reply
    enters the average (trap weights keep nothing: with every client a target, the model never changes).
    `settings`: the RunConfig fields it reads (the attack group of flags), for help texts and checks.
    `reads_each_client`: it arms each client for its own update even under secure aggregation, and reads
    every client's images apart from their sum (so `--max-attack-images` caps one client's images, not the sum's).
    """

    name: str
    kind: AttackKind
    factory: str
    summary: str
    may_run_async: bool = False
    models: tuple[str, ...] | None = None
    models_reason: str = ""
    needs_imprint: bool = False
    averages_targets: bool = True
    settings: tuple[str, ...] = ()
    reads_each_client: bool = False

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"attack {self.name!r}: factory must be 'module:Class', got {self.factory!r}")
        if self.may_run_async and self.kind is not AttackKind.PASSIVE:
            raise ValueError(f"attack {self.name!r}: an active attack is part of the round, never in the background")

    @property
    def active(self) -> bool:
        return self.kind is AttackKind.ACTIVE

    def reaches(self, model: str) -> bool:
        return self.models is None or model in self.models


NO_ATTACK = "none"
_PASSIVE_SETTINGS = ("iterations", "restarts", "label_deals", "bn_statistics", "tv_weight", "no_replay")
_REGISTRY: dict[str, AttackSpec] = {}


def register(spec: AttackSpec) -> AttackSpec:
    """Adds `spec` to the registry; a name taken already (or 'none') is an error, not an override."""
    if spec.name in _REGISTRY or spec.name == NO_ATTACK:
        raise ValueError(f"an attack named {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes an attack (a test's own, after the test)."""
    del _REGISTRY[name]


def attack_names() -> tuple[str, ...]:
    """Every registered attack's name, in registration order."""
    return tuple(_REGISTRY)


def attack_specs() -> tuple[AttackSpec, ...]:
    """Every registered attack's entry, in registration order."""
    return tuple(_REGISTRY.values())


def attack_spec(name: str) -> AttackSpec:
    """The registry entry of `name`; an unknown name raises ValueError listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def find_attack(name: str) -> AttackSpec | None:
    """The registry entry of `name`, or None (no attack, or one this process has not registered)."""
    return _REGISTRY.get(name)


for _name, _summary in (("dlg", "Deep Leakage from Gradients (Zhu et al. 2019): L-BFGS on images and soft labels"),
                        ("idlg", "iDLG (Zhao et al. 2020): labels read off the last layer, then DLG's optimisation"),
                        ("ig", "Inverting Gradients (Geiping et al. 2020): cosine distance, TV prior, signed Adam"),
                        ("fedavg", "FedAvg-aware IG (Dimitrov et al. 2022): one image copy per epoch tied by an "
                                   "order-free prior, labels counted along the client's steps")):
    register(AttackSpec(_name, AttackKind.PASSIVE, "fl_sim.server.passive:PassiveInversion", _summary,
                        may_run_async=True, settings=_PASSIVE_SETTINGS))
register(AttackSpec(
    "imprint", AttackKind.ACTIVE, "fl_sim.server.active:ImprintAttack",
    "Robbing the Fed (Fowl et al. 2022): an imprint block of binning rows in front of the model",
    needs_imprint=True, settings=("imprint_bins", "imprint_blocks")))
register(AttackSpec(
    "trap", AttackKind.ACTIVE, "fl_sim.server.active:TrapAttack",
    "trap weights (Boenisch et al. 2023): rows of the first linear layer that fire for few images",
    models=("mlp", "cnn"), models_reason="a ReLU linear layer that sees the whole image", averages_targets=False))
register(AttackSpec(
    "trap-quiet", AttackKind.ACTIVE, "fl_sim.server.active:QuietTrapAttack",
    "trap weights made to pass --defense inspect: noise where the trap writes zeros, every parameter jittered",
    models=("mlp", "cnn"), models_reason="a ReLU linear layer that sees the whole image", averages_targets=False))
register(AttackSpec(
    "mosaic", AttackKind.ACTIVE, "fl_sim.server.mosaic:MosaicAttack",
    "per-client imprint rows (after LOKI, MANDRAKE, Pasquini et al.): each client's images read apart, even "
    "from a secure aggregate", needs_imprint=True, settings=("imprint_bins", "imprint_blocks"),
    reads_each_client=True))
register(AttackSpec(
    "spear", AttackKind.PASSIVE, "fl_sim.server.exact:SpearAttack",
    "SPEAR (Dimitrov et al. 2024): a whole batch read exactly off the first ReLU linear layer's update (rank, "
    "ReLU sparsity, bias scale); on cnn its features, inverted through the convolutions",
    may_run_async=True, models=("mlp", "cnn"), models_reason="a linear layer followed by a ReLU, before any "
                                                             "pooling", settings=("iterations",)))
register(AttackSpec(
    "cocktail", AttackKind.PASSIVE, "fl_sim.server.exact:CocktailAttack",
    "Cocktail Party Attack (Kariyappa et al. 2023): FastICA un-mixes the first linear layer's update into the "
    "batch's images, also a secure aggregate's mean",
    may_run_async=True, models=("mlp",), models_reason="a linear layer that sees the image"))
