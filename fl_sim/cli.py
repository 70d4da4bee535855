"""The `fl-sim` command line: one sub-command per task, each in its own module."""
import argparse
import sys

from . import attack, deploy, pretrain, report, run, sweep
from .config import ConfigError
from .data import DataNotFoundError

COMMANDS = {
    "attack": (attack, "invert victims' updates once, without Flower, and score the reconstructions"),
    "run": (run, "a Flower simulation whose server inverts every client's update each round"),
    "sweep": (sweep, "every point of a grid of settings (fl-sim attack or run at each), with results.csv and plots"),
    "pretrain": (pretrain, "train a model centrally for a few epochs and save it for --init ckpt.pt"),
    "report": (report, "rebuild the HTML page of a run (gallery.html) or a sweep (index.html, results.csv, plots)"),
    "deploy": (deploy, "the same federation as real Flower processes: locally, or as docker-compose services"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-sim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        return module.main(args)
    except (ConfigError, DataNotFoundError) as error:
        print(f"fl-sim {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
