"""Hand-built Flower messages and contexts, to call the apps and the strategy without Ray or a SuperLink."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from attacker import TrainingSettings, get_attack
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import parameter_names
from fl_sim.server.flower_private import SUPERLINK_NODE_ID, ErrorCode, TaskIdentity
from fl_sim.server.passive import PassiveInversion
from fl_sim.server.resume import CHECKPOINT
from fl_sim.server.strategy import AttackPlan, InvertingStrategy, ServerAttack


@pytest.fixture
def server_identity():
    """Messages are created by a task; in a real run the ServerApp process is that task."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def node_context(partition_id: int, num_partitions: int, run_config: dict | None = None) -> Context:
    """A SuperNode's context as Flower's simulation builds it (node id = 100 + partition id)."""
    return Context(run_id=1, node_id=100 + partition_id, state=RecordDict(), run_config=run_config or {},
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions})


def train_message(weights: dict, settings: TrainingSettings, server_round: int, node_id: int = 100) -> Message:
    config = ConfigRecord({**settings.to_config(), "server-round": server_round})
    return Message(RecordDict({"arrays": ArrayRecord(weights), "config": config}), dst_node_id=node_id,
                   message_type=MessageType.TRAIN)


def lenet():
    """The global model of these tests: LeNet for MNIST, seeded."""
    return build_model("lenet", 1, 28, 10, init="default", seed=0)


def inverting_fedavg(recorder, clients: int = 2, attack: str | None = "idlg", iterations: int = 1,
                     secure_aggregation: bool = False, wrapped=None, image_shape=(1, 28, 28),
                     **attack_options) -> InvertingStrategy:
    """The malicious server of these tests: FedAvg over `clients` nodes (100, 101, ...) wrapped, attacking LeNet
    on MNIST with the passive `attack` (None: no attack) on the CPU; `attack_options` are ServerAttack's."""
    wrapped = wrapped or FedAvg(min_train_nodes=clients, min_available_nodes=clients, fraction_evaluate=0.0)
    inversion = attack and PassiveInversion(lenet(), get_attack(attack, restarts=1), image_shape, num_classes=10,
                                            iterations=iterations, device="cpu")
    server_attack = inversion and ServerAttack(inversion, tuple(parameter_names(lenet())), **attack_options)
    return InvertingStrategy(wrapped, server_attack or None, recorder,
                             partitions={100 + p: p for p in range(clients)}, secure_aggregation=secure_aggregation)


class LocalGrid:
    """A Grid whose nodes 100, 101, ... run the ClientApp in this process: a federation without Ray.

    A ClientApp that raises gets an error reply, as Flower's simulation sends one.
    """

    def __init__(self, client_app, num_clients: int):
        self.client_app, self.num_clients = client_app, num_clients

    def get_node_ids(self):
        return [100 + partition_id for partition_id in range(self.num_clients)]

    def send_and_receive(self, messages, *, timeout=None):
        return [self.reply(msg) for msg in messages]

    def reply(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, node_context(msg.metadata.dst_node_id - 100, self.num_clients))
        except Exception as error:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error)}:<'{error}'>"),
                           reply_to=msg)


class Recorder(list):
    """Collects what the strategy reports: (round, victims, results) per attack, (round, fault) in .faults,
    (round, flags, attacked) in .inspections."""

    def __init__(self):
        super().__init__()
        self.faults = []
        self.inspections = []

    def record_attack(self, server_round, victims, results, update_norms, seconds):
        self.append((server_round, victims, results))

    def record_faults(self, server_round, faults):
        self.faults.extend((server_round, fault) for fault in faults)

    def record_inspection(self, server_round, flags, attacked):
        self.inspections.append((server_round, dict(flags), attacked))


def trap_round(config, model_of, public):
    """Round 1 of a federation of 2 clients running fl-sim's ClientApp as `config` sets it, in this process: the
    server arms client 0 with trap weights (from `public` images) for a model `model_of()` builds, client 1 gets
    the global model (another `model_of()`); the strategy, its recorder and the replies, not yet aggregated."""
    from clients.app import make_client_app
    from fl_sim.server.active import TrapAttack

    grid = LocalGrid(make_client_app(config), num_clients=2)
    model = model_of()
    attack = ServerAttack(TrapAttack(model_of(), public, 10), tuple(parameter_names(model)),
                          plan=AttackPlan(clients=frozenset({0})))
    recorder = Recorder()
    strategy = InvertingStrategy(FedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0), attack,
                                 recorder, partitions={100: 0, 101: 1})
    messages = strategy.configure_train(1, ArrayRecord(model.state_dict()),
                                        ConfigRecord(config.training.to_config()), grid)
    return strategy, recorder, list(grid.send_and_receive(messages))


def live_commands() -> list[tuple[int, str]]:
    """(pid, command line) of every live process, read from /proc (zombies have no command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and command:
            found.append((int(entry.name), command))
    return found


# The run settings the tests of the apps were written against, in place of the demo federation that RunConfig's
# defaults are (imprint on shards of 48-64, momentum 0.9): iDLG, whole partitions, plain SGD at 0.1, batches of 32.
PLAIN = dict(attack="idlg", min_shard=1, max_shard=0, batch_size=32, lr=0.1, momentum=0.0)


def plain_config(**settings) -> RunConfig:
    """RunConfig(**settings) over PLAIN instead of the demo defaults."""
    return RunConfig(**{**PLAIN, **settings})


def wait_for_round_one(process: subprocess.Popen, out: Path, limit: float = 300) -> None:
    """Waits until the `fl-sim run` in `process` has committed round 1 (OUT/checkpoint.pt); fails if the run
    ends first or takes longer than `limit` seconds."""
    deadline = time.monotonic() + limit
    while not (out / CHECKPOINT).exists():
        if process.poll() is not None:
            raise AssertionError(f"fl-sim run ended early: {process.stderr.read()[-3000:] if process.stderr else ''}")
        assert time.monotonic() < deadline, f"round 1 did not finish in {limit:.0f} s"
        time.sleep(0.05)


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flwr_env(home: Path) -> dict[str, str]:
    """The flwr CLI with its own FLWR_HOME (its own local SuperLink, on free ports), this venv's tools on PATH
    (`flwr run` starts `flower-superlink`), nothing installed at run time and nothing asked of the internet."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def superlinks_of(flwr_home: Path) -> list[int]:
    """Pids of the local SuperLinks `flwr run` started for this FLWR_HOME (it leaves them running)."""
    return [pid for pid, command in live_commands()
            if "flower-superlink" in command and f"{flwr_home}/local-superlink/" in command]
