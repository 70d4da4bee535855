"""Command-line flags shared by `fl-sim attack`, `fl-sim run` and the sweeps, and their checks.

Every check runs before any work starts and fails with one sentence (ConfigError), so a bad flag
never costs a half-finished run.
"""
import argparse
import tempfile
from pathlib import Path

from attacker.settings import BATCHNORM_MODES, PRESETS, TrainingSettings, get_attack
from clients.defenses import KINDS, Defense, parse_defense

from .data import DATASETS
from .models import MODELS


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def add_task_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    """The data, model, training and attack flags every command shares."""
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)} (default mnist)")
    data.add_argument("--data-root", default=None,
                      help="folder holding the data (default $FL_SIM_DATA, else ./data)")
    data.add_argument("--model", default="lenet", help=f"one of {', '.join(MODELS)} (default lenet)")
    data.add_argument("--init", default="default",
                      help="'default' (PyTorch's, seeded), 'paper' (U(-0.5, 0.5), as DLG) or a checkpoint path")
    train = parser.add_argument_group("client training (what the server configures)")
    train.add_argument("--local-steps", type=int, default=1, help="K SGD steps per round (1 = FedSGD)")
    train.add_argument("--batch-size", type=int, default=1, help="B examples per step")
    train.add_argument("--epochs", type=int, default=1, help="passes over the K x B round examples")
    train.add_argument("--lr", type=float, default=0.1, help="client learning rate")
    train.add_argument("--momentum", type=float, default=0.0, help="client SGD momentum")
    train.add_argument("--batchnorm", default="train", choices=BATCHNORM_MODES,
                       help="batch-norm layers in local training: batch statistics (train, default) or the "
                            "model's running ones, not updated (frozen)")
    train.add_argument("--defense", default="none", metavar="SPEC",
                       help=f"what clients do to their update before sending it: {', '.join(KINDS)}, or steps "
                            "joined by '+', e.g. clip:4+noise:0.01 (see clients/defenses.py)")
    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack", default="idlg", help=f"one of {', '.join(PRESETS)}, or 'none'")
    attack.add_argument("--iterations", type=int, default=300,
                        help="optimiser iterations per victim (an L-BFGS iteration is up to 20 updates, as in DLG)")
    attack.add_argument("--restarts", type=int, default=None, help="random restarts per victim (default: the preset's)")
    attack.add_argument("--no-replay", action="store_true",
                        help="treat the weight change / (steps x lr) as one gradient instead of replaying K steps")
    attack.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=out_required, help="output folder")


def training_settings(args) -> TrainingSettings:
    try:
        return TrainingSettings(lr=args.lr, local_steps=args.local_steps, batch_size=args.batch_size,
                                epochs=args.epochs, momentum=args.momentum, batchnorm=args.batchnorm)
    except ValueError as error:  # its messages start with the setting's name: the flag's, without "--"
        raise ConfigError(f"--{error}") from None


def check_task_arguments(args) -> None:
    """Everything that can be checked without loading data, in one pass."""
    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}")
    if args.model not in MODELS:
        raise ConfigError(f"unknown model {args.model!r}: choose one of {', '.join(MODELS)}")
    if args.attack != "none" and args.attack not in PRESETS:
        raise ConfigError(f"unknown attack {args.attack!r}: choose one of {', '.join(PRESETS)} or none")
    if args.init not in ("default", "paper") and not Path(args.init).is_file():
        raise ConfigError(f"--init {args.init!r} is neither 'default', 'paper' nor an existing checkpoint file")
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
    if args.restarts is not None and args.restarts < 1:
        raise ConfigError(f"--restarts must be at least 1, got {args.restarts}")
    if args.device not in ("auto", "cpu", "cuda") and not str(args.device).startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    training_settings(args)
    defense(args)
    check_writable(args.out)


def defense(args) -> Defense:
    try:
        return parse_defense(args.defense)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def attack_config(args):
    return get_attack(args.attack, restarts=args.restarts)


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
