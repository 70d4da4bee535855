"""How a `flwr run` whose run config cannot run ends: failed in Flower's terms, in the run config's words."""
import re
from logging import ERROR
from typing import NoReturn

from flwr.common import log

from fl_sim.contract.run_config import DECLARED, flower_key
from fl_sim.contract.setting import flag_of
from fl_sim.server.flower_private import AppExitException, ExitCode, add_exit_handler


class RunRefused(AppExitException):
    """A run config or federation the ServerApp cannot run: the run ends as failed (Flower's FAILED status,
    its details this message), before any round."""

    exit_code = ExitCode.SERVERAPP_STRATEGY_PRECONDITION_UNMET


def in_flower_terms(message: str) -> str:
    """A ConfigError's message with each `--flag` it names written as the run-config key `flwr run -c` takes."""
    keys = {flag_of(name): flower_key(name) for name in DECLARED}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda found: keys.get(found.group(0), found.group(0)), message)


def refuse_run(message: str) -> NoReturn:
    """Ends a `flwr run` as failed with `message`: raised, Flower records the run as finished with an error whose
    details are the message (`flwr ls`). Flower logs the traceback and its exit code after it; the exit handler
    says the message once more after those, so it is the last thing the run's log (`flwr log`) says."""
    log(ERROR, message)
    add_exit_handler(lambda: log(ERROR, message))
    raise RunRefused(message) from None
