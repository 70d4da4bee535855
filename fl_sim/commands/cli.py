"""The `fl-sim` command line: one sub-command per task, each in its own module, imported only when chosen.

`fl-sim --help`, `fl-sim report` and `fl-sim deploy compose` need neither torch nor Flower, so they start
at once; the modules of the other commands import them when they run.
"""
import argparse
import errno
import importlib
import sys

from fl_sim.contract.setting import ConfigError

# A full disk, a quota or a read-only disk: the machine's state, not a bug (exit code 2, one line).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
COMMANDS = {
    "attack": ("fl_sim.commands.attack",
               "invert victims' updates once, without Flower, and score the reconstructions"),
    "run": ("fl_sim.commands.run", "a Flower simulation whose server inverts every client's update each round"),
    "sweep": ("fl_sim.commands.sweep",
              "every point of a grid of settings (fl-sim attack or run at each), with results.csv and plots"),
    "pretrain": ("fl_sim.commands.pretrain",
                 "train a model centrally for a few epochs and save it for --init ckpt.pt"),
    "report": ("fl_sim.commands.report",
               "rebuild the HTML page of a run (gallery.html) or a sweep (index.html, results.csv, plots)"),
    "deploy": ("fl_sim.commands.deploy",
               "the same federation as real Flower processes: locally, or as docker-compose services"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in `argv` (all of them when None) gets its module imported."""
    chosen = next((arg for arg in argv if not arg.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="fl-sim", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            importlib.import_module(module).add_arguments(sub)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line, with `given_flags`: the settings the user typed (not left at their default)."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    suppress_defaults(parser)
    args.given_flags = frozenset(vars(parser.parse_args(argv))) - {"command"}
    return args


def suppress_defaults(parser: argparse.ArgumentParser) -> None:
    """Every default of `parser` and its sub-parsers set to SUPPRESS, so parsing yields only what was typed."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                suppress_defaults(sub)


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen command; what goes wrong ends in one line and an exit code (docs/usage.md, "Exit codes")."""
    from fl_sim.commands import guard

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        with guard.interruptible():
            return module.main(args)
    except guard.Interrupted as interrupt:
        print(interrupt.message(args.command), file=sys.stderr)
        if interrupt.end_process:  # a Flower server thread still waits for clients that are gone
            guard.exit_now(interrupt.exit_code)
        return interrupt.exit_code
    except ConfigError as error:
        print(f"fl-sim {args.command}: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        if type(error).__name__ != "DataNotFoundError":  # fl_sim.learning.data's, not imported here: it needs torch
            raise
        print(f"fl-sim {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in NO_ROOM:
            raise
        where = f" writing {error.filename!r}" if error.filename else ""
        print(f"fl-sim {args.command}: {error.strerror or error}{where}: free space (or write elsewhere) and "
              f"run the command again{' with --resume' if args.command == 'run' else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
