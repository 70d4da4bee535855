"""The attack registry: every attack the server may run, by name, with what the rest of the program must know of it.

One `AttackSpec` per attack says what is otherwise scattered over flags, checks and help texts: passive or
active, whether `--attack-async` may run it, the models it reaches, whether the clients' architecture needs the
imprint block, the run settings it reads, where its implementation lives and, for a passive attack, its
optimisation preset (`AttackConfig`). The implementation (a subclass of `fl_sim.server.attacks.Attack`) is
named by an import path and imported only when the attack is built, so this module, like the rest of the
contract, imports nothing but the standard library: `fl-sim --help`, `fl-sim report` and the run config's
checks read the registry without torch or Flower.

A new attack is one class implementing `Attack` and one `register(AttackSpec(...))` (docs/architecture.md).
"""
from dataclasses import dataclass, replace
from enum import StrEnum

from fl_sim.contract.models import ModelTrait, model_specs
from fl_sim.contract.presets import AttackConfig, LabelStrategy, Objective, Optimizer
from fl_sim.contract.setting import ConfigError

IMPRINT_BINS = 256  # the imprint block's rows for an attack that needs it, when --imprint-bins is 0
TRAP_EVERYONE = ("--attack trap or qbi without --attack-clients traps every client, and a trapped client's reply is "
                 "left out of the average, so the global model will not change; name the targets with "
                 "--attack-clients (e.g. 0) to let the others train it")


@dataclass(frozen=True)
class RowSizing:
    """How an attack that deals the imprint rows out to a round's clients sizes the block when --imprint-bins is 0.

    Each client of the round gets its own slice of `blocks` blocks of bins, a bin one row. The block is built for
    `one_step` rows an image with one local step and `several_steps` with more, over the images a client trains
    on in a round; never fewer than `least_bins` bins a block.

    Parameters
    ----------
    one_step, several_steps : int
        Rows an image of the round with one local step, and with several.
    least_bins : int
        The fewest bins a block the attack can read at all.
    """

    one_step: int
    several_steps: int
    least_bins: int = 2

    def bins(self, images: int, blocks: int, one_step: bool) -> int:
        """The bins of each block in one client's slice for `images` images a client."""
        per_image = self.one_step if one_step else self.several_steps
        return max(self.least_bins, -(-per_image * images // blocks))

    def rows(self, clients: int, images: int, blocks: int, one_step: bool) -> int:
        """The imprint block's rows for `clients` clients a round of `images` images each.

        Parameters
        ----------
        clients : int
            The clients the round's rows are dealt out to.
        images : int
            The most images one of them trains on in the round.
        blocks : int
            --imprint-blocks.
        one_step : bool
            Whether a client's round is one SGD step.

        Returns
        -------
        int
            clients x blocks x bins: a multiple of `blocks`, every client's slice the same.
        """
        return clients * blocks * self.bins(images, blocks, one_step)

    def least(self, clients: int, blocks: int) -> int:
        """The fewest rows that give `clients` clients `blocks` blocks of `least_bins` bins each."""
        return clients * blocks * self.least_bins


class AttackKind(StrEnum):
    """What the server does beyond reading updates."""

    PASSIVE = "passive"  # honest-but-curious: sends the global model, changes nothing in the average
    ACTIVE = "active"  # a malicious server: sends its targets weights (or an architecture) of its own choosing


@dataclass(frozen=True)
class AttackSpec:
    """One registry entry: an attack's name, its traits, and the class that implements it.

    `factory` is "module:Class", a subclass of fl_sim.server.attacks.Attack, imported when the attack is
    built (never by this module). `needs`: the model trait it needs (fl_sim/contract/models.py; None: it
    reaches every model), which says why the others are out of reach. `needs_imprint`: the clients build the
    imprint block in front of the model (fl_sim/learning/models/imprint.py). `averages_targets`: whether
    anything of a target's reply enters the average (trap weights keep nothing: with every client a target,
    the model never changes).
    `options`: the RunConfig fields it reads (the attack group of flags), for help texts and checks.
    `preset`: a passive attack's optimisation (objective, optimiser, labels, priors), run by attacker.invert.
    `reads_each_client`: it arms each client for its own update even under secure aggregation, and reads
    every client's images apart from their sum (so `--max-attack-images` caps one client's images, not the sum's).
    `sizes_rows`: it deals the imprint rows out to the round's clients, and without --imprint-bins the block is
    built for the round (RunConfig.imprint_rows): the clients sampled, the images each trains on, one step or more.
    """

    name: str
    kind: AttackKind
    factory: str
    summary: str
    may_run_async: bool = False
    needs: ModelTrait | None = None
    needs_imprint: bool = False
    averages_targets: bool = True
    options: tuple[str, ...] = ()
    reads_each_client: bool = False
    preset: AttackConfig | None = None
    sizes_rows: RowSizing | None = None

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"attack {self.name!r}: factory must be 'module:Class', got {self.factory!r}")
        if self.may_run_async and self.kind is not AttackKind.PASSIVE:
            raise ValueError(f"attack {self.name!r}: an active attack is part of the round, never in the background")
        if self.sizes_rows is not None and not self.needs_imprint:
            raise ValueError(f"attack {self.name!r}: only an attack on the imprint block sizes its rows")
        if self.preset is not None and self.preset.name != self.name:
            raise ValueError(f"attack {self.name!r}: its preset is named {self.preset.name!r}")

    @property
    def active(self) -> bool:
        return self.kind is AttackKind.ACTIVE

    @property
    def models(self) -> tuple[str, ...] | None:
        """The registered models it reaches (None: every model)."""
        return None if self.needs is None else tuple(spec.name for spec in model_specs(self.needs))

    def reaches(self, model: str) -> bool:
        return self.models is None or model in self.models


# the mosaic's rows an image (docs/threat-models.md: 4 read 86-88% of the round's images with one step; 6 with
# several steps)
MOSAIC_ROWS = RowSizing(one_step=4, several_steps=6)
NO_ATTACK = "none"
_PASSIVE_OPTIONS = ("iterations", "restarts", "label_deals", "bn_statistics", "tv_weight", "no_replay")
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


def get_attack(name: str, **overrides: object) -> AttackConfig:
    """The preset of passive attack `name` with `overrides` (those not None) replaced.

    Parameters
    ----------
    name : str
        A registered passive attack.
    **overrides
        AttackConfig fields; None keeps the preset's.

    Returns
    -------
    AttackConfig
        The optimisation attacker.invert runs; an attack without a preset raises ValueError.
    """
    preset = attack_spec(name).preset
    if preset is None:
        raise ValueError(f"attack {name!r} has no optimisation preset: choose one of "
                         f"{', '.join(spec.name for spec in attack_specs() if spec.preset is not None)}")
    return replace(preset, **{key: value for key, value in overrides.items() if value is not None})  # type: ignore[arg-type]


def check_attack_name(name: str) -> None:
    """A ConfigError unless `name` is a registered attack or 'none'."""
    if name not in (*attack_names(), NO_ATTACK):
        raise ConfigError(f"unknown attack {name!r}: choose one of {', '.join((*attack_names(), NO_ATTACK))}")


def check_attack(name: str, model: str, attack_async: bool, imprint_rows: int, imprint_blocks: int) -> None:
    """What the registry says of attack `name` on the rest of the run, as one ConfigError.

    Parameters
    ----------
    name : str
        --attack (a registered name or 'none').
    model : str
        --model.
    attack_async : bool
        --attack-async.
    imprint_rows, imprint_blocks : int
        The imprint block's rows the clients build, and --imprint-blocks.
    """
    check_attack_name(name)
    spec = find_attack(name)
    if spec is None:
        return
    if spec.models is not None and not spec.reaches(model):
        others = [other.name for other in attack_specs() if other.active and other.reaches(model)]
        raise ConfigError(f"{spec.name} reaches only {', '.join(spec.models)} ({spec.needs}), not {model}: use "
                          f"--attack {' or '.join(others) or 'with another model'} for it (docs/threat-models.md)")
    if spec.needs_imprint and imprint_rows % imprint_blocks:
        raise ConfigError(f"--imprint-bins {imprint_rows} must split evenly into --imprint-blocks {imprint_blocks}")
    if attack_async and not spec.may_run_async:
        background = [other.name for other in attack_specs() if other.may_run_async]
        raise ConfigError(f"--attack-async runs only passive attacks ({', '.join(background)}) in the "
                          f"background: {name} arms the weights the server sends and decides what of "
                          f"its targets' replies enters the average, so it is part of the round; drop "
                          f"--attack-async or choose a passive attack")


def trap_starves(attack: str, attack_clients: tuple[int, ...] | None) -> bool:
    """An attack that keeps nothing of its targets' replies (trap weights), on every client, leaves nothing to
    average (docs/threat-models.md)."""
    spec = find_attack(attack)
    return spec is not None and not spec.averages_targets and attack_clients is None


def _passive(preset: AttackConfig, summary: str) -> AttackSpec:
    return register(AttackSpec(preset.name, AttackKind.PASSIVE, "fl_sim.server.passive:PassiveInversion", summary,
                               may_run_async=True, options=_PASSIVE_OPTIONS, preset=preset))


_passive(AttackConfig("dlg", Objective.L2, Optimizer.LBFGS, LabelStrategy.JOINT, updates_per_iteration=20, restarts=2),
         "Deep Leakage from Gradients (Zhu et al. 2019): L-BFGS on images and soft labels")
_passive(AttackConfig("idlg", Objective.L2, Optimizer.LBFGS, LabelStrategy.ANALYTIC, updates_per_iteration=20,
                      restarts=2),
         "iDLG (Zhao et al. 2020): labels read off the last layer, then DLG's optimisation")
_passive(AttackConfig("ig", Objective.COSINE, Optimizer.SIGNED_ADAM, LabelStrategy.ANALYTIC, tv_weight=1e-2, box=True,
                      lr=0.1, lr_decay=True, restarts=1),
         "Inverting Gradients (Geiping et al. 2020): cosine distance, TV prior, signed Adam")
_passive(AttackConfig("fedavg", Objective.COSINE, Optimizer.SIGNED_ADAM, LabelStrategy.ANALYTIC, tv_weight=1e-2,
                      box=True, lr=0.1, lr_decay=True, restarts=1, epoch_copies=True, epoch_prior=1.0, label_path=True),
         "FedAvg-aware IG (Dimitrov et al. 2022): one image copy per epoch tied by an order-free prior, labels "
         "counted along the client's steps")
register(AttackSpec(
    "imprint", AttackKind.ACTIVE, "fl_sim.server.active:ImprintAttack",
    "Robbing the Fed (Fowl et al. 2022): an imprint block of binning rows in front of the model",
    needs_imprint=True, options=("imprint_bins", "imprint_blocks")))
register(AttackSpec(
    "trap", AttackKind.ACTIVE, "fl_sim.server.param_only:TrapAttack",
    "trap weights (Boenisch et al. 2023): rows of the first linear layer that fire for few images; parameter "
    "values only (a user's model: convolutions before it set to carry the image, LOKI-style)",
    needs=ModelTrait.DENSE_SEES_IMAGE, averages_targets=False))
register(AttackSpec(
    "qbi", AttackKind.ACTIVE, "fl_sim.server.param_only:QbiAttack",
    "quantile-based bias initialisation (Nowak et al. 2024): random rows of the first linear layer, each bias "
    "at its pre-activation's 1 - 1/B quantile over the public images; parameter values only, the trap's reach",
    needs=ModelTrait.DENSE_SEES_IMAGE, averages_targets=False))
register(AttackSpec(
    "trap-quiet", AttackKind.ACTIVE, "fl_sim.server.active:QuietTrapAttack",
    "trap weights made to pass --defense inspect: noise where the trap writes zeros, every parameter jittered",
    needs=ModelTrait.DENSE_SEES_IMAGE, averages_targets=False))
register(AttackSpec(
    "mosaic", AttackKind.ACTIVE, "fl_sim.server.mosaic:MosaicAttack",
    "per-client imprint rows (after LOKI, MANDRAKE, Pasquini et al.): each client's images read apart, even "
    "from a secure aggregate", needs_imprint=True, options=("imprint_bins", "imprint_blocks"),
    reads_each_client=True, sizes_rows=MOSAIC_ROWS))
register(AttackSpec(
    "spear", AttackKind.PASSIVE, "fl_sim.server.exact:SpearAttack",
    "SPEAR (Dimitrov et al. 2024): a whole batch read exactly off the first ReLU linear layer's update (rank, "
    "ReLU sparsity, bias scale); on cnn its features, inverted through the convolutions",
    may_run_async=True, needs=ModelTrait.DENSE_SEES_IMAGE, options=("iterations",)))
register(AttackSpec(
    "cocktail", AttackKind.PASSIVE, "fl_sim.server.exact:CocktailAttack",
    "Cocktail Party Attack (Kariyappa et al. 2023): FastICA un-mixes the first linear layer's update into the "
    "batch's images, also a secure aggregate's mean",
    may_run_async=True, needs=ModelTrait.LINEAR_FIRST))
register(AttackSpec(
    "disguise", AttackKind.ACTIVE, "fl_sim.server.disguise:DisguiseAttack",
    "a SEER-class disguised model (after Garov et al. 2024): the model sent is trained with a secret decoder that "
    "reads the round's image with a chosen property (e.g. the brightest) off the (secure) aggregate; parameter "
    "values only, of the agreed architecture (its checkpoint: --disguise-checkpoint)",
    needs=ModelTrait.DENSE_SEES_IMAGE, options=("disguise_checkpoint",)))
