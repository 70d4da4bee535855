"""The Flower apps under examples/, run as their users run them (`flwr run examples/APP` under a real local
SuperLink), and what their ClientApps accept of what a ServerApp sends."""
import ast
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from flower_helpers import flwr_env, superlinks_of
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FLWR = Path(sys.executable).parent / "flwr"
APPS = {"quickstart-pytorch": "quickstart_pytorch", "mlp-pytorch": "mlp_pytorch"}


def cifar(shared_data: Path) -> Path:
    folder = shared_data / "cifar10-subset" / "train"
    assert folder.is_dir(), f"the CIFAR-10 image folder is missing: expected {folder}"
    return folder


@dataclass
class FlwrRun:
    """What `flwr run --stream` printed, the run as `flwr ls` lists it afterwards, and the wall time."""

    done: subprocess.CompletedProcess
    run: dict
    seconds: float


def flwr_run(app: Path, home: Path, supernodes: int, overrides: str) -> FlwrRun:
    """`flwr run APP --stream` with its own FLWR_HOME on a federation of `supernodes` SuperNodes; the local SuperLink
    it starts is stopped afterwards. Fails if the run changed the app's files."""
    env = flwr_env(home)
    files = {path: path.read_bytes() for path in app.rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    start = time.monotonic()
    try:
        done = subprocess.run([str(FLWR), "run", str(app), "--stream", "--federation-config",
                               f"num-supernodes={supernodes}", "-c", overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
        started = re.search(r"Successfully started run (\d+)", done.stdout)
        assert done.returncode == 0 and started, done.stdout[-3000:] + done.stderr[-3000:]
        listed = subprocess.run([str(FLWR), "ls", "--run-id", started[1], "--format", "json"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        run = json.loads(listed.stdout)["runs"][0]
    finally:
        for pid in superlinks_of(home):
            os.kill(pid, signal.SIGTERM)
    changed = [str(path) for path, content in files.items() if not path.is_file() or path.read_bytes() != content]
    assert not changed, f"flwr run changed the app's files: {changed}"
    return FlwrRun(done, run, seconds)


@pytest.mark.parametrize("name", APPS)
def test_the_app_runs_under_flwr_run_and_every_client_trains_every_round(name, shared_data, tmp_path):
    rounds, clients = 2, 2
    overrides = (f"num-server-rounds={rounds} fraction-train=1.0 data-path='{cifar(shared_data)}' "
                 "max-train-examples=16")
    result = flwr_run(EXAMPLES / name, tmp_path / "flwr-home", clients, overrides)
    print(f"{name}: flwr run took {result.seconds:.1f} s")
    assert result.run["status"] == "finished:completed", result.run
    log = result.done.stdout
    assert log.count(f"aggregate_train: Received {clients} results and 0 failures") == rounds, log[-3000:]
    assert log.count(f"aggregate_evaluate: Received {clients} results and 0 failures") == rounds, log[-3000:]


def imported_modules(source: Path) -> set[str]:
    """The top-level packages a module imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("name", APPS)
def test_the_app_is_a_plain_flower_app_with_nothing_of_fl_sim(name):
    package = EXAMPLES / name / APPS[name]
    ours = {"fl_sim", "attacker", "clients"}
    for module in ("task.py", "client_app.py", "server_app.py"):
        assert not imported_modules(package / module) & ours, f"{name}/{module} imports fl-sim's code"


def train_message(arrays: ArrayRecord, lr: float) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": lr})}), dst_node_id=100,
                   message_type=MessageType.TRAIN)


@pytest.mark.parametrize("name", APPS)
def test_the_client_app_trains_the_servers_model_and_refuses_other_layers(name, shared_data, monkeypatch,
                                                                          server_identity):
    """The ClientApp loads what the ServerApp sends strictly: the Net's own state_dict round-trips through an
    ArrayRecord, trains and comes back with the same keys; a layer the Net lacks is refused."""
    monkeypatch.syspath_prepend(str(EXAMPLES / name))
    task = importlib.import_module(f"{APPS[name]}.task")
    client = importlib.import_module(f"{APPS[name]}.client_app")
    defaults = tomllib.loads((EXAMPLES / name / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = {**defaults, "data-path": str(cifar(shared_data)), "max-train-examples": 4}
    context = Context(run_id=1, node_id=100, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 3, "num-partitions": 10})

    torch.manual_seed(0)
    sent = task.Net().state_dict()
    reply = client.app(train_message(ArrayRecord(sent), lr=0.1), context)
    assert not reply.has_error(), reply.error
    trained = reply.content["arrays"].to_torch_state_dict()
    assert list(trained) == list(sent)
    assert any(not torch.equal(trained[key], sent[key]) for key in sent), "the model came back untrained"
    assert reply.content["metrics"]["num-examples"] == 4

    extra = {**sent, "imprint.weight": torch.zeros(8, 3072)}
    with pytest.raises(RuntimeError, match='Unexpected key.*"imprint.weight"'):
        client.app(train_message(ArrayRecord(extra), lr=0.1), context)
