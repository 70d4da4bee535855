"""Command-line flags shared by `fl-sim attack`, `fl-sim run` and the sweeps, and their checks.

Every check runs before any work starts and fails with one sentence (ConfigError), so a bad flag never
costs a half-finished run. Light on purpose (no torch, no Flower): the names it offers come from the run
config's contract (fl_sim/contract/run_config.py).
"""
import argparse
from pathlib import Path

from fl_sim.contract.attacks import attack_specs
from fl_sim.contract.protocol import BatchNormMode, TrainingSettings, TrainMode
from fl_sim.contract.run_config import (
    DATASETS,
    DEFENSE_KINDS,
    DEVICES,
    MODELS,
    NO_ATTACK,
    ConfigError,
    DefenseSpec,
    RunConfig,
    check_run,
)

__all__ = ["ConfigError", "add_task_arguments", "check_task_arguments",
           "defense", "training_settings"]


def add_task_arguments(parser: argparse.ArgumentParser, out_required: bool = True,
                       train_mode: TrainMode = TrainMode.STEPS, batch_size: int = 1, model: str = "lenet") -> None:
    """The data, model, training and attack flags every command shares (with the command's own defaults
    for the training mode, batch size and model)."""
    data = parser.add_argument_group("data and model")
    data.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)} (default mnist)")
    data.add_argument("--data-root", default=None,
                      help="folder holding the data (default $FL_SIM_DATA, else ./data)")
    data.add_argument("--model", default=model, help=f"one of {', '.join(MODELS)} (default {model})")
    data.add_argument("--init", default="default",
                      help="'default' (PyTorch's, seeded), 'paper' (U(-0.5, 0.5), as DLG) or a checkpoint path")
    train = parser.add_argument_group("client training (what the server configures)")
    train.add_argument("--train-mode", default=train_mode, choices=list(TrainMode),
                       help=f"fedsgd: one step on B examples; steps: K steps of B examples drawn each round; epochs: "
                            f"E epochs over the client's whole shard in shuffled batches of B (default {train_mode})")
    train.add_argument("--local-steps", type=int, default=1, help="K SGD steps per round (steps mode)")
    train.add_argument("--batch-size", type=int, default=batch_size, help=f"B examples per step (default {batch_size})")
    train.add_argument("--epochs", type=int, default=1,
                       help="E passes over the shard (epochs mode) or over the K x B round examples (steps mode)")
    train.add_argument("--lr", type=float, default=0.1, help="client learning rate")
    train.add_argument("--momentum", type=float, default=0.0, help="client SGD momentum")
    train.add_argument("--weight-decay", type=float, default=0.0, help="client SGD weight decay")
    train.add_argument("--batchnorm", default=BatchNormMode.TRAIN, choices=list(BatchNormMode),
                       help="batch-norm layers in local training: batch statistics (train, default) or the "
                            "model's running ones, not updated (frozen)")
    train.add_argument("--defense", default="none", metavar="SPEC",
                       help=f"what clients do to their update before sending it: {', '.join(DEFENSE_KINDS)}, or "
                            "steps joined by '+', e.g. clip:4+noise:0.01 (see clients/defenses.py)")
    attack = parser.add_argument_group("attack")
    attack.add_argument("--attack", default="idlg",
                        help=f"one of {', '.join(f'{spec.name} ({spec.kind})' for spec in attack_specs())}, or "
                             f"'{NO_ATTACK}'")
    attack.add_argument("--iterations", type=int, default=300,
                        help="optimiser iterations per victim (an L-BFGS iteration is up to 20 updates, as in DLG)")
    attack.add_argument("--restarts", type=int, default=None, help="random restarts per victim (default: the preset's)")
    attack.add_argument("--bn-statistics", type=float, default=0.0, metavar="WEIGHT",
                        help="weight of a term matching the batch-norm running statistics the client sent to those "
                             "the replay produces (GradInversion; 0: off, default; see docs/findings.md section 6)")
    attack.add_argument("--tv-weight", type=float, default=None, metavar="WEIGHT",
                        help="weight of the total-variation image prior (default: the preset's; ig 0.01, dlg and "
                             "idlg 0); the best weight depends on the model (docs/benchmarks.md)")
    attack.add_argument("--no-replay", action="store_true",
                        help="treat the weight change / (steps x lr) as one gradient instead of replaying K steps")
    attack.add_argument("--imprint-bins", type=int, default=0,
                        help="rows of the imprint block the clients build (default 256 with --attack imprint)")
    attack.add_argument("--imprint-blocks", type=int, default=4,
                        help="statistics the imprint rows measure; more blocks, fewer images sharing every bin (default 4)")
    attack.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=out_required, help="output folder")


def training_settings(args) -> TrainingSettings:
    """The client training the task flags configure (RunConfig.settings), over `--shard-size` in epochs mode."""
    return task_config(args).settings.for_shard(getattr(args, "shard_size", None))


def task_config(args) -> RunConfig:
    """The task flags of `fl-sim attack` (and a sweep's attack points) as a typed RunConfig."""
    values = {name: getattr(args, name) for name in ("dataset", "model", "attack", "iterations", "restarts",
                                                     "bn_statistics", "tv_weight", "device", "seed", "defense",
                                                     "local_steps", "batch_size", "epochs", "lr", "momentum",
                                                     "batchnorm", "weight_decay", "imprint_bins", "imprint_blocks",
                                                     "train_mode", "no_replay")}
    return RunConfig.from_values(values, RunConfig(out=args.out, init=args.init))


def check_task_arguments(args) -> None:
    """Everything the task flags of `fl-sim attack` allow checking without loading data, in one pass."""
    check_run(task_config(args))


def defense(args) -> DefenseSpec:
    return DefenseSpec.parse(args.defense)
