"""The run's checks that touch the file system: `--init`'s checkpoint is a file, the output folder can be written.

Beside RunConfig.check (standard library, no file system) for the server (`flwr run`) and every command.
"""
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
    check_writable(config.out)


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
