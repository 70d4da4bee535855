"""Command-line flags shared by `fl-sim attack`, `fl-sim run` and the sweeps, and their checks.

Each flag is built from its RunConfig field's declaration (fl_sim/contract/run_config.py: type, default,
`Setting`), so a setting is declared once. Every check runs before any work starts and fails with one
sentence (ConfigError), so a bad flag never costs a half-finished run. Light on purpose (no torch, no Flower).
"""
import argparse
import types
import typing
from collections.abc import Collection
from enum import StrEnum

from fl_sim.contract.attacks import NO_ATTACK, attack_specs
from fl_sim.contract.defenses import DefenseSpec
from fl_sim.contract.protocol import TrainingSettings, TrainMode
from fl_sim.contract.run_config import DECLARED, FIELD_TYPES, RunConfig
from fl_sim.contract.setting import ConfigError, Group, flag_of, to_text
from fl_sim.results.preflight import check_run

__all__ = ["ConfigError", "add_settings", "add_task_arguments", "check_task_arguments",
           "defense", "training_settings"]

# What `fl-sim attack` starts from: the research setting (one image per step, DLG's LeNet).
# Its training and attack stay the research setting's whatever `fl-sim run`'s (a demo federation) are.
TASK_DEFAULTS = RunConfig(train_mode=TrainMode.STEPS, batch_size=1, model="lenet", epochs=1, lr=0.1,
                          momentum=0.0, attack="idlg")
# Where it differs from fl-sim run's (RunConfig's) defaults: what sweeps take over to default to the same setting.
TASK_OVERRIDES = {name: getattr(TASK_DEFAULTS, name) for name in FIELD_TYPES
                  if getattr(TASK_DEFAULTS, name) != getattr(RunConfig(), name)}
SECAGG_OPTIONS = tuple(name for name, declared in DECLARED.items() if declared.group == Group.SECAGG)
TASK_GROUPS = (Group.DATA, Group.TRAINING, Group.ATTACK, Group.GENERAL)  # the settings every command shares


def add_task_arguments(parser: argparse.ArgumentParser, out_required: bool = True,
                       defaults: RunConfig = TASK_DEFAULTS) -> None:
    """The data, model, training and attack flags every command shares, with the command's own defaults
    (`fl-sim run` passes RunConfig(); `fl-sim attack` trains in steps mode on one image, a LeNet, as sweeps do).
    --attack is written here by hand: it lists the attack registry's names, not an enum."""
    for group in TASK_GROUPS:
        container = parser if group == Group.GENERAL else parser.add_argument_group(group.value)
        if group == Group.ATTACK:
            names = ", ".join(f"{spec.name} ({spec.kind})" for spec in attack_specs())
            container.add_argument("--attack", default=defaults.attack,
                                   help=f"one of {names}, or '{NO_ATTACK}' (default %(default)s)")
        add_settings(container, group, defaults, required={"out"} if out_required else ())


def add_settings(container: argparse._ActionsContainer, group: Group, defaults: RunConfig,
                 only: Collection[str] | None = None, required: Collection[str] = ()) -> None:
    """A flag for every RunConfig field declared in `group` (those named in `only`, if given), in declaration order.

    Everything comes from the field's declaration (fl_sim/contract/run_config.py): `--name-with-hyphens`, the
    argparse type from its annotation, its help and metavar; the default is `defaults`' value as the command
    line spells it. Values are only parsed here: RunConfig coerces and checks them (one sentence, exit 2).
    """
    for name, declared in DECLARED.items():
        if declared.group == group and (only is None or name in only):
            container.add_argument(flag_of(name), **flag_options(name, getattr(defaults, name), name in required))


def flag_options(name: str, default: object, required: bool) -> dict[str, typing.Any]:
    """add_argument's keywords for RunConfig field `name` with the command's `default` value."""
    declared, kind = DECLARED[name], FIELD_TYPES[name]
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # `X | None`: the flag takes an X
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    options: dict[str, typing.Any] = {"help": declared.full_help}
    if declared.given:
        options.update(required=required, default=None)
    elif declared.flag_default is not None:
        options["default"] = declared.flag_default
    elif default is None or isinstance(default, (bool, int, float, str)):
        options["default"] = default  # a StrEnum member is a str: the enum's value
    else:
        options["default"] = to_text(default)  # tuples, mappings, a DefenseSpec: as the flag spells them
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction if declared.negatable else "store_true"
    elif kind in (int, float):
        options["type"] = kind
    if declared.choices and isinstance(kind, type) and issubclass(kind, StrEnum):
        options["choices"] = list(kind)
    if declared.metavar is not None:
        options["metavar"] = declared.metavar
    return options


def training_settings(args) -> TrainingSettings:
    """The client training the task flags configure (RunConfig.training), over `--shard-size` in epochs mode."""
    settings, shard_size = task_config(args).training, getattr(args, "shard_size", None)
    return settings if shard_size is None else settings.for_shard(shard_size)


def task_config(args) -> RunConfig:
    """The task flags of `fl-sim attack` (and a sweep's attack points) as a typed RunConfig."""
    values = {name: getattr(args, name) for name in ("dataset", "model", "attack", "iterations", "restarts",
                                                     "label_deals", "bn_statistics", "tv_weight", "device", "seed",
                                                     "defense", "local_steps", "batch_size", "epochs", "lr",
                                                     "momentum", "batchnorm", "weight_decay", "imprint_bins",
                                                     "imprint_blocks", "train_mode", "no_replay")}
    # SecAgg+'s settings (`fl-sim attack` has their flags; a sweep's points take the defaults)
    values.update({name: getattr(args, name) for name in SECAGG_OPTIONS if hasattr(args, name)})
    if getattr(args, "data_root", None) is not None:  # the victims' ClientApp mods load the data from it too
        values["data_root"] = args.data_root
    if getattr(args, "num_victims", None) is not None:  # the clients whose aggregate secure aggregation reveals
        values["num_clients"] = args.num_victims
    if getattr(args, "shard_size", None) is not None:  # epochs mode: every victim's shard (the mosaic sizes by it)
        values["min_shard"] = values["max_shard"] = args.shard_size
    return RunConfig.from_values(values, RunConfig(out=args.out, init=args.init))


def check_task_arguments(args) -> None:
    """Everything the task flags of `fl-sim attack` allow checking without loading data, in one pass."""
    check_run(task_config(args))


def defense(args) -> DefenseSpec:
    return DefenseSpec.parse(args.defense)
