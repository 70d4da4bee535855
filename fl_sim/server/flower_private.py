"""Every use of flwr's private or internal modules, in one place.

fl-sim pins flwr exactly (pyproject.toml: flwr[simulation]==1.41.0) because these names are not
flwr's public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`, `flwr.simulation`, `flwr.common`'s
exports) and may move or change in any release. When upgrading flwr, this file is what to check:
the tests that use it fail at import if a name moved.

The daemons' flag parsers cost half a second to import, so they are loaded only when asked for.
"""
import contextlib
from collections.abc import Iterator

from flwr.app.exception import AppExitException  # the base of an app's errors that end its run as failed
from flwr.cli.config_utils import load_and_validate  # flwr's own check of [tool.flwr.app] in pyproject.toml
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # what a real SuperLink stamps on messages
from flwr.common.secure_aggregation.quantization import dequantize, quantize  # SecAgg+'s own (fl_sim/server/secagg.py)
from flwr.common.secure_aggregation.secaggplus_constants import (  # where a SecAgg+ reply holds its masked vector
    RECORD_KEY_CONFIGS as SECAGG_CONFIGS,
)
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat  # the legacy records (FitIns/FitRes ...) SecAgg+'s workflow speaks
from flwr.server.compat.grid_client_proxy import GridClientProxy  # how the legacy workflows name a client
from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig  # run_simulation's backend_config type
from flwr.serverapp.strategy.strategy_utils import (  # FedAvg's own averaging and reply checks
    aggregate_arrayrecords,
    validate_message_reply_consistency,
)
from flwr.supercore.exit import ExitCode, add_exit_handler  # the exit codes and the last words of a run's process
from flwr.supercore.run import Run  # the Grid interface's run (fl_sim/server/secagg.py's SummingGrid forwards it)
from flwr.supercore.task_identity import TaskIdentity  # who creates a Message: set by the runtime's process
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation's grid (SummingGrid's window)

__all__ = ["AppExitException", "BackendConfig", "ErrorCode", "ExitCode", "GridClientProxy", "InMemoryGrid",
           "SECAGG_CONFIGS", "Run",
           "SUPERLINK_NODE_ID", "SecAggKey", "TaskIdentity", "add_exit_handler", "aggregate_arrayrecords",
           "as_message_task", "daemon_flag_parsers", "dequantize", "load_and_validate", "quantize", "recorddict_compat",
           "validate_message_reply_consistency"]


@contextlib.contextmanager
def as_message_task() -> Iterator[None]:
    """Messages may be created outside a Flower runtime (`fl-sim attack` hands its victims train messages): the
    process stands as the SuperLink's task while inside, and whatever identity it had is restored after."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def daemon_flag_parsers() -> dict:
    """{executable: its argparse parser builder}, to check the flags fl-sim deploy passes each daemon."""
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as supernode

    return {"flower-superlink": superlink, "flower-supernode": supernode, "flower-superexec": superexec}
