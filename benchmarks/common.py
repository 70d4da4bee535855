"""What every benchmark shares: the repository on `sys.path` and the common flags, each with one default.

A benchmark runs as `python benchmarks/NAME.py`, so Python puts `benchmarks/` on `sys.path` and `import common`
finds this module; importing it puts the repository root there too, so `fl_sim`, `attacker` and `clients` import
without an installed package or PYTHONPATH. Import it before them.

The data root defaults as the Makefile's does: `$FL_SIM_DATA`, else `../shared/data` beside the repository.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA_ROOT = os.environ.get("FL_SIM_DATA") or str(ROOT.parent / "shared" / "data")


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, described by its module docstring's first paragraph.

    Parameters
    ----------
    doc : str or None
        The benchmark's module docstring (`__doc__`).

    Returns
    -------
    argparse.ArgumentParser
        The parser, with no flags yet.
    """
    description = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(description=description)


def add_data_root(parser: argparse.ArgumentParser, help: str = "folder holding the data") -> None:
    """Add `--data-root`, defaulting to `$FL_SIM_DATA`, else `../shared/data` beside the repository.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The benchmark's parser.
    help : str
        What the folder is for this benchmark; the default is appended.
    """
    parser.add_argument("--data-root", default=DATA_ROOT,
                        help=f"{help} (default $FL_SIM_DATA, else ../shared/data beside the repository: %(default)s)")


def add_seed(parser: argparse.ArgumentParser, help: str = "seed of the data, the models and the attack") -> None:
    """Add `--seed` (an int, default 0).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The benchmark's parser.
    help : str
        What the seed draws in this benchmark.
    """
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """Add `--device` (`auto`, `cpu` or `cuda`; `auto` takes the GPU when there is one).

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The benchmark's parser.
    """
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu or cuda")


def add_out(parser: argparse.ArgumentParser, default: str | None = None, help: str = "folder for the outputs") -> None:
    """Add `--out`, a folder; required when there is no default.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The benchmark's parser.
    default : str or None
        The folder when `--out` is not given; None makes the flag required.
    help : str
        What the benchmark writes there.
    """
    if default is None:
        parser.add_argument("--out", required=True, help=help)
    else:
        parser.add_argument("--out", default=default, help=f"{help} (default %(default)s)")
