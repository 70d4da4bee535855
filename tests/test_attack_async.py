"""`--attack-async`: the attack of a round runs on a background thread beside the next round's training.

The runs here are the ServerApp's whole `run_federation` over real ClientApps in this process (LocalGrid, no
Ray): the same rows as a synchronous run, active attacks refused, a checkpoint that never names a round whose
attack rows are not all on disk (so a kill at any moment resumes with nothing doubled or lost), and an
error on the attack thread raised in the main thread.
"""
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from flower_helpers import LocalGrid

from clients.app import make_client_app
from fl_sim.commands import cli
from fl_sim.contract.faults import Fault
from fl_sim.contract.protocol import TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.results import evaluation
from fl_sim.results.outputs import read_jsonl
from fl_sim.server import server_app
from fl_sim.server.background import AttackQueue
from fl_sim.server.resume import CHECKPOINT, load_checkpoint

pytestmark = pytest.mark.usefixtures("server_identity")
ROUNDS, CLIENTS, FAULTY = 3, 3, 2  # client 2 sends NaN every round: a fault row beside the attack rows
TIMING = {"seconds", "round_attack_seconds", "elapsed_seconds"}


def config_for(shared_data, out: Path, **changes) -> RunConfig:
    return RunConfig(out=str(out), rounds=ROUNDS, num_clients=CLIENTS, data_root=str(shared_data),
                     model="lenet", train_mode=TrainMode.STEPS, batch_size=1, attack="idlg", iterations=2,
                     restarts=1, seed=3, inject_faults={FAULTY: Fault.NAN}, device="cpu", **changes)


def federate(config: RunConfig, resume: bool = False) -> None:
    """`fl-sim run`'s ServerApp over the project's ClientApps, in this process."""
    grid: Any = LocalGrid(make_client_app(config), config.num_clients)  # a Grid in all but its base class
    server_app.run_federation(grid, config, resume)


def rows(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The rows of a run's file, in file order, without the fields that time the run."""
    return [{key: value for key, value in row.items() if key not in TIMING} for row in read_jsonl(Path(out) / name)]


def committed(out: Path) -> int:
    checkpoint = load_checkpoint(out)
    return checkpoint.server_round if checkpoint else 0


@pytest.fixture(scope="module")
def sync_run(shared_data, tmp_path_factory):
    """The synchronous run every asynchronous one must equal, row for row."""
    from fl_sim.server.flower_private import (  # server_identity is per test; this is once
        SUPERLINK_NODE_ID,
        TaskIdentity,
    )

    torch.set_num_threads(2)  # as conftest's per-test fixture, which runs after this one: the float sums agree
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        out = tmp_path_factory.mktemp("sync") / "run"
        federate(config_for(shared_data, out))
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    return out


def test_the_sync_run_attacks_every_round_and_leaves_the_faulty_client_out(sync_run):
    metrics = rows(sync_run)
    assert [(row["round"], row["client"], row["status"]) for row in metrics] == [
        (r, c, status) for r in range(1, ROUNDS + 1) for c, status in ((2, "rejected"), (0, "ok"), (1, "ok"))]
    assert committed(sync_run) == ROUNDS


class Gate:
    """Makes the attack thread deterministic: round r's rows are written only after round r has ended (its
    global row, its checkpoint decision), so each round ends with its own attack still running."""

    def __init__(self, monkeypatch):
        self.ended = {r: threading.Event() for r in range(ROUNDS + 1)}
        self.saved: list[int] = []
        self.threads: set[str] = set()
        record_attack, round_end_call = server_app.Scoreboard.record_attack, server_app.RoundEnd.__call__
        save_checkpoint = server_app.save_checkpoint
        gate = self

        def gated_record_attack(scoreboard, server_round, *args):
            gate.threads.add(threading.current_thread().name)
            assert gate.ended[server_round].wait(60), f"round {server_round} did not end"
            return record_attack(scoreboard, server_round, *args)

        def signalling_call(round_end, server_round, arrays):
            result = round_end_call(round_end, server_round, arrays)
            gate.ended[server_round].set()
            return result

        def counted_save(out, checkpoint):
            save_checkpoint(out, checkpoint)
            gate.saved.append(checkpoint.server_round)

        monkeypatch.setattr(server_app.Scoreboard, "record_attack", gated_record_attack)
        monkeypatch.setattr(server_app.RoundEnd, "__call__", signalling_call)
        monkeypatch.setattr(server_app, "save_checkpoint", counted_save)


def test_async_and_sync_runs_write_the_same_rows_and_train_the_same_model(shared_data, tmp_path, sync_run,
                                                                         monkeypatch):
    gate = Gate(monkeypatch)
    out = tmp_path / "async"
    federate(config_for(shared_data, out, attack_async=True))

    assert gate.threads and all(name.startswith("fl-sim-attack") for name in gate.threads)  # it did run beside
    assert rows(out) == rows(sync_run)  # same reconstructions and scores, same order (faults included)
    assert rows(out, "global.jsonl") == rows(sync_run, "global.jsonl")  # same accuracies: the average is untouched
    assert gate.saved == [1, 2, 3]  # round r committed as round r + 1 ended (its attack done), the last at the end
    assert committed(out) == ROUNDS
    for row in rows(out):
        if row["status"] == "ok":
            assert (out / f"round-{row['round']:03d}/client-{row['client']:03d}/reconstruction.png").is_file()
    assert "round-003/client-001/reconstruction.png" in (out / "gallery.html").read_text()


def test_active_attacks_cannot_run_in_the_background(shared_data, tmp_path, capsys):
    flags = ["run", "--dataset", "mnist", "--data-root", str(shared_data), "--model", "cnn", "--num-clients", "2",
             "--rounds", "1", "--out", str(tmp_path / "bad"), "--attack-async"]
    for attack in ("imprint", "trap"):
        assert cli.main([*flags, "--attack", attack]) == 2
        message = capsys.readouterr().err
        assert "--attack-async runs only passive attacks (dlg, idlg, ig, fedavg, " in message
        assert f") in the background: {attack} arms" in message
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="--attack-async runs only passive attacks"):
        RunConfig.from_flower({"attack-async": True, "attack": "imprint"}).check()
    assert RunConfig.from_flower({"attack-async": "true", "attack": "ig"}).attack_async is True
    assert cli.parse_args(["run", "--out", "o", "--attack-async"]).attack_async is True


def snapshot(out: Path, into: Path) -> None:
    """A copy of OUT as a kill at this moment would leave it (a file renamed away while copied is missed, as a
    temporary file would be)."""
    for path in sorted(out.rglob("*")):
        target = into / path.relative_to(out)
        try:
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        except FileNotFoundError:
            continue


def test_a_kill_at_any_moment_resumes_with_nothing_doubled_or_lost(shared_data, tmp_path, sync_run, monkeypatch):
    """Snapshots of OUT after every row, image and checkpoint written (each what a kill then would leave): in
    each, every row of the rounds its checkpoint commits is on disk, once; resumed, two of them end as the
    uninterrupted run does."""
    gate = Gate(monkeypatch)
    out, snapshots, lock = tmp_path / "async", [], threading.Lock()

    def taking_snapshots(function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            with lock:
                if out.exists():
                    snapshots.append(tmp_path / "kills" / f"{len(snapshots):03d}")
                    snapshot(out, snapshots[-1])
            return result
        return wrapper

    monkeypatch.setattr(server_app, "append_jsonl", taking_snapshots(server_app.append_jsonl))
    monkeypatch.setattr(server_app, "save_checkpoint", taking_snapshots(server_app.save_checkpoint))
    monkeypatch.setattr(evaluation, "save_images", taking_snapshots(evaluation.save_images))
    federate(config_for(shared_data, out, attack_async=True))
    assert gate.saved == [1, 2, 3]

    reference, reference_global = rows(sync_run), rows(sync_run, "global.jsonl")
    ahead = []  # snapshots holding rows of rounds their checkpoint does not commit yet
    for folder in snapshots:
        done = committed(folder)
        kept = [row for row in rows(folder) if row["round"] <= done]
        assert kept == [row for row in reference if row["round"] <= done], folder  # all there, none twice
        assert [row for row in rows(folder, "global.jsonl") if row["round"] <= done] == reference_global[:done]
        if any(row["round"] > done for row in rows(folder)) and done < ROUNDS:
            ahead.append(folder)
    assert ahead, "no snapshot caught an attack running past its round's end"

    # the latest kill with uncommitted attack rows, and a kill before round 1 was committed at all
    for folder in (ahead[-1], next(f for f in snapshots if not (f / CHECKPOINT).exists() and rows(f))):
        monkeypatch.undo()  # resume without the gate and the snapshots
        federate(config_for(shared_data, folder, attack_async=True), resume=True)
        assert rows(folder) == reference, folder
        assert rows(folder, "global.jsonl") == reference_global, folder
        assert committed(folder) == ROUNDS
        assert not list(folder.rglob("*.tmp"))


def test_an_error_on_the_attack_thread_is_raised_in_the_main_thread(shared_data, tmp_path, monkeypatch):
    record_attack = server_app.Scoreboard.record_attack

    def failing_in_round_2(scoreboard, server_round, *args):
        if server_round == 2:
            raise RuntimeError(f"recorder bug in {threading.current_thread().name}")
        return record_attack(scoreboard, server_round, *args)

    monkeypatch.setattr(server_app.Scoreboard, "record_attack", failing_in_round_2)
    out = tmp_path / "async"
    with pytest.raises(RuntimeError, match="recorder bug in fl-sim-attack"):
        federate(config_for(shared_data, out, attack_async=True))
    assert committed(out) == 1  # round 2's rows are not all there: never committed
    attacked = {(row["round"], row["client"]) for row in rows(out) if row["status"] == "ok"}
    assert {(1, 0), (1, 1), (3, 0), (3, 1)} <= attacked  # the queue was drained: round 3 was still attacked
    assert (2, 0) not in attacked


def test_the_queue_raises_each_error_once_and_drains_everything():
    queue, ran = AttackQueue(), []
    queue.submit(1, lambda: ran.append(1))
    queue.submit(2, lambda: 1 / 0)
    queue.submit(3, lambda: ran.append(3))
    queue.wait(1)
    assert queue.done_through(1)
    with pytest.raises(ZeroDivisionError):
        queue.wait(2)
    assert not queue.done_through(2)
    queue.close()  # the error of round 2 was raised already; round 3 still ran
    assert ran == [1, 3]

    queue = AttackQueue()
    queue.submit(1, lambda: 1 / 0)
    queue.submit(2, lambda: ran.append(2))
    with pytest.raises(ZeroDivisionError):
        queue.close()  # the end of a run: drained, then the error
    assert ran == [1, 3, 2]
    with pytest.raises(RuntimeError, match="round 1 already has an attack job"):
        queue.submit(1, lambda: None)
