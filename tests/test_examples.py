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
from flwr.serverapp.strategy import FedAvg

import fl_sim
from fl_sim.contract.attacks import attack_specs
from fl_sim.results.gallery import client_folder
from fl_sim.results.rows import read_metrics
from fl_sim.server.refusal import RunRefused

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


PNG = b"\x89PNG\r\n\x1a\n"


# The attack each end-to-end run audits with: a passive one on the CNN (2 iterations: its rows, not its quality), the
# parameter-only trap on the MLP, whose first layer sees the whole image.
E2E_ATTACKS = {"quickstart-pytorch": "ig", "mlp-pytorch": "trap"}


@pytest.mark.parametrize("name", APPS)
def test_the_audited_app_runs_under_flwr_run_with_a_row_and_images_for_every_client_and_round(name, shared_data,
                                                                                               tmp_path):
    """`flwr run examples/APP` as its README says, made small through `-c` (2 SuperNodes of 16 training images, one
    step of 16 a round, 2 rounds): Flower marks the run finished, and the malicious server wrote a scored row, the
    reconstruction and its nearest reference images for every client in every round, and the gallery; the trap
    on the MLP recovers images exactly."""
    rounds, clients, examples, out, attack = 2, 2, 16, tmp_path / "audit", E2E_ATTACKS[name]
    overrides = (f"num-server-rounds={rounds} fraction-train=1.0 data-path='{cifar(shared_data)}' "
                 f"max-train-examples={examples} batch-size={examples} audit-out='{out}' audit-attack='{attack}' "
                 "audit-iterations=2")
    result = flwr_run(EXAMPLES / name, tmp_path / "flwr-home", clients, overrides)
    print(f"{name}: flwr run with {attack} took {result.seconds:.1f} s")
    log = result.done.stdout
    assert result.run["status"] == "finished:completed", (result.run, log[-3000:])
    assert log.count(f"audit round {rounds}: {clients} client(s)") == 1, log[-3000:]

    rows = read_metrics(out / "metrics.jsonl")
    nodes = {row.client for row in rows}
    assert len(nodes) == clients and not nodes & set(range(clients)), f"clients not named by node id: {nodes}"
    assert sorted((row.round, row.client) for row in rows) == [(r, node) for r in range(1, rounds + 1)
                                                               for node in sorted(nodes)]
    for row in rows:
        assert row.status == "ok" and row.num_examples == examples, row
        assert row.scored_against == f"nearest image of {cifar(shared_data)}", row
        assert row.psnr is not None and len(row.psnr_images or []) == examples, row
        for image in ("reconstruction.png", "truth.png"):
            path = out / client_folder(row.round, row.client) / image
            assert path.read_bytes().startswith(PNG), f"{path} is not a PNG"
        if attack == "trap":
            assert max(row.psnr_images or []) >= 40, f"trap recovered no image exactly: {row}"
    gallery = (out / "gallery.html").read_text()
    missing = [row for row in rows if f"{client_folder(row.round, row.client)}/reconstruction.png" not in gallery]
    assert not missing, f"the gallery shows no reconstruction of {missing}"


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
def test_the_app_is_a_plain_flower_app_but_for_the_wrapped_strategy(name):
    """Nothing of fl-sim in the model, the data or the ClientApp; in the ServerApp, `import fl_sim` used once, as
    `fl_sim.malicious(...)`."""
    package = EXAMPLES / name / APPS[name]
    ours = {"fl_sim", "attacker", "clients"}
    for module in ("task.py", "client_app.py"):
        assert not imported_modules(package / module) & ours, f"{name}/{module} imports fl-sim's code"
    server = ast.parse((package / "server_app.py").read_text())
    assert imported_modules(package / "server_app.py") & ours == {"fl_sim"}
    assert not [node for node in ast.walk(server) if isinstance(node, ast.ImportFrom) and node.module
                and node.module.split(".")[0] in ours], f"{name}/server_app.py imports from fl-sim's modules"
    uses = [node.attr for node in ast.walk(server)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fl_sim"]
    assert uses == ["malicious"], f"{name}/server_app.py uses fl_sim for {uses}"


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


class UnusedGrid:
    """A Grid the ServerApp must not reach: it refuses before round 1."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp used the grid ({name}) although the audit could not run")


@pytest.mark.parametrize("name", APPS)
def test_without_a_reference_set_the_audit_refuses_before_round_one_in_one_line(name, monkeypatch, tmp_path):
    """With the hub's CIFAR-10 (no data-path) the wrapped line names no reference set: the ServerApp ends the run
    as failed (Flower's AppExitException) with one sentence, and writes nothing."""
    monkeypatch.syspath_prepend(str(EXAMPLES / name))
    server = importlib.import_module(f"{APPS[name]}.server_app")
    defaults = tomllib.loads((EXAMPLES / name / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    context = Context(run_id=1, node_id=0, state=RecordDict(), node_config={},
                      run_config={**defaults, "data-path": "", "audit-out": str(tmp_path / "audit")})
    with pytest.raises(RunRefused) as refused:
        server.main(UnusedGrid(), context)
    message = str(refused.value)
    assert "name the reference set" in message and "\n" not in message, message
    assert not (tmp_path / "audit").exists()


class TwoNodes:
    """The grid of one round's sampling: SuperNodes 100 and 101."""

    def get_node_ids(self):
        return [100, 101]


@pytest.mark.parametrize("name", APPS)
def test_each_active_attack_refuses_the_net_in_one_line_or_sends_what_the_client_loads_strictly(
        name, shared_data, monkeypatch, tmp_path, server_identity):
    """What the malicious server sends a stock client (which loads it into its own `Net()`, strictly) must load, or
    the attack is refused before round 1 with one sentence naming it; ig (passive) sends the global model."""
    monkeypatch.syspath_prepend(str(EXAMPLES / name))
    task = importlib.import_module(f"{APPS[name]}.task")
    client = importlib.import_module(f"{APPS[name]}.client_app")
    defaults = tomllib.loads((EXAMPLES / name / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    reference = str(cifar(shared_data).parent / "test")  # the server's own images: fewer to load than the clients'
    loaded, refused = [], {}
    for attack in ["ig", *(spec.name for spec in attack_specs() if spec.active)]:
        context = Context(run_id=1, node_id=0, state=RecordDict(), node_config={},
                          run_config={**defaults, "data-path": reference, "audit-attack": attack,
                                      "audit-out": str(tmp_path / attack)})
        try:  # the example's wrapped line
            strategy = fl_sim.malicious(FedAvg(fraction_train=1.0), model=task.Net(), context=context,
                                        reference=reference, normalize=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                        momentum=0.9)
        except RunRefused as refusal:
            refused[attack] = str(refusal)
            continue
        global_weights = task.Net().state_dict()
        messages = list(strategy.configure_train(1, ArrayRecord(global_weights), ConfigRecord({"lr": 0.1}),
                                                 TwoNodes()))
        assert len(messages) == 2
        received = [client.received_model(msg).state_dict() for msg in messages]  # load_state_dict, strict
        armed = any(not torch.equal(model[key], global_weights[key]) for model in received for key in model)
        assert armed == (attack != "ig"), f"{attack} sent {'armed' if armed else 'the global'} weights"
        loaded.append(attack)
    print(f"{name}: loaded strictly {loaded}; refused {sorted(refused)}")
    assert "ig" in loaded
    for attack, message in refused.items():
        assert attack in message and "\n" not in message, message


@pytest.mark.parametrize("name", APPS)
def test_the_readmes_diff_is_the_server_apps_code(name):
    """The README's diff of the malicious server against the honest one: its added and kept lines are the server
    app's, its removed line is gone from it."""
    readme = (EXAMPLES / name / "README.md").read_text()
    diff = readme.split("```diff\n")[1].split("```")[0].splitlines()
    server = {line.strip() for line in (EXAMPLES / name / APPS[name] / "server_app.py").read_text().splitlines()}
    kept = [line[1:].strip() for line in diff if line[:1] in "+ " and line[1:].strip() not in ("", "...")]
    removed = [line[1:].strip() for line in diff if line.startswith("-")]
    assert kept and removed, diff
    assert [line for line in kept if line not in server] == [], "the README's diff is not the server app's code"
    assert not set(removed) & server, "the README's removed line is still in the server app"


def test_the_secagg_app_audited_through_flowers_secagg_plus_reads_its_aggregate(shared_data, tmp_path):
    """`flwr run examples/secagg-pytorch`: Flower's LegacyContext + SecAggPlusWorkflow with the legacy FedAvg wrapped.
    The server sees one aggregate a round; the trap armed every client's model, and the row names the clients behind
    the aggregate and the images it holds. The Net's pooled first layer gives back blurs, not images."""
    clients, examples, out = 3, 8, tmp_path / "audit"
    overrides = (f"num-server-rounds=1 min-clients={clients} batch-size={examples} max-train-examples={examples} "
                 f"data-path='{cifar(shared_data)}' audit-out='{out}' audit-attack='trap'")
    result = flwr_run(EXAMPLES / "secagg-pytorch", tmp_path / "flwr-home", clients, overrides)
    print(f"secagg-pytorch: flwr run took {result.seconds:.1f} s")
    assert result.run["status"] == "finished:completed", (result.run, result.done.stdout[-3000:])
    assert "Secure aggregation completed" in result.done.stdout

    (row,) = read_metrics(out / "metrics.jsonl")
    assert (row.round, row.client, row.secure_aggregation) == (1, "aggregate", "secagg+")
    assert len(row.clients or []) == clients and row.num_examples == clients * examples, row
    assert row.status == "ok" and row.psnr is not None and (row.recovered_at_30db or 0) < 0.5, row
    assert (out / client_folder(1, "aggregate") / "reconstruction.png").read_bytes().startswith(PNG)
