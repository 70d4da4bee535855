"""The run's checks that touch the file system: `--init`'s checkpoint is a file, `--attack disguise`'s checkpoint and
its config exist and were trained for the run's model, the output folder can be written.

Beside RunConfig.check (standard library, no file system) for the server (`flwr run`) and every command.
"""
import json
import tempfile
from pathlib import Path

from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError


def check_run(config: RunConfig) -> None:
    """RunConfig.check, plus what it leaves to the file system: the --init checkpoint and the output folder.

    Parameters
    ----------
    config : RunConfig
        The run; a setting that cannot work raises ConfigError (one sentence).
    """
    config.check()
    if config.init not in ("default", "paper") and not Path(config.init).is_file():
        raise ConfigError(f"--init {config.init!r} is neither 'default', 'paper' nor an existing checkpoint file")
    if config.attack == "disguise":
        disguise_config(config.disguise_checkpoint, config.model)
    check_writable(config.out)


DISGUISE_TRAIN = "python benchmarks/disguise_train.py"


def disguise_config(path: str | Path, model: str) -> dict:
    """The config written beside a disguise checkpoint (benchmarks/disguise_train.py), checked against the run.

    Parameters
    ----------
    path : str or Path
        `--disguise-checkpoint`.
    model : str
        The run's `--model`.

    Returns
    -------
    dict
        The config as JSON (attacker/disguise.py `DisguiseConfig`'s fields).

    Raises
    ------
    ConfigError
        In one line: no path given, the checkpoint or its `.json` missing or unreadable, or trained for another model.
    """
    if not str(path):
        raise ConfigError(f"--attack disguise needs --disguise-checkpoint PATH (train one with {DISGUISE_TRAIN} "
                          "--out PATH)")
    path = Path(path)
    beside = path.with_suffix(".json")
    for needed in (path, beside):
        if not needed.is_file():
            raise ConfigError(f"disguise checkpoint {str(needed)!r} does not exist: train one with {DISGUISE_TRAIN} "
                              f"--out {path}")
    try:
        found = json.loads(beside.read_text())
        trained_for = found["model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"disguise checkpoint config {str(beside)!r} cannot be read "
                          f"({type(error).__name__})") from None
    if trained_for != model:
        raise ConfigError(f"disguise checkpoint {str(path)!r} was trained for --model {trained_for}, not {model}")
    return found


def check_writable(folder: str | Path) -> None:
    """Tries a file in the nearest existing folder on the way (permissions, read-only disks), leaving nothing.

    Parameters
    ----------
    folder : str or Path
        A folder to be written, existing or not; raises ConfigError when it cannot be.
    """
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
