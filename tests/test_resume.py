"""Interrupted runs: checkpoints hold weights only, a resume drops what an unfinished round left, flags that
contradict the run are refused, and a run killed with SIGKILL after round 1 resumes to its last round."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flower_helpers import wait_for_round_one
from PIL import Image

from fl_sim.commands import cli, run
from fl_sim.commands.config import ConfigError
from fl_sim.contract.protocol import TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.results.gallery import client_folder
from fl_sim.results.outputs import append_jsonl, read_jsonl, write_json
from fl_sim.server.resume import CHECKPOINT, Checkpoint, load_checkpoint, rewind, save_checkpoint


class Executable:
    """Unpickles by calling a function (here a harmless one that makes a tensor, so everything else about the
    file looks right): torch.load(weights_only=True) must refuse to call it."""

    def __reduce__(self):
        return (torch.ones, (2,))


def test_a_checkpoint_round_trips_and_loads_weights_only(tmp_path):
    weights = {"w": torch.randn(3, 2), "steps": torch.tensor(4)}
    save_checkpoint(tmp_path, Checkpoint(2, weights, 12.5))
    loaded = load_checkpoint(tmp_path)
    assert (loaded.server_round, loaded.elapsed_seconds) == (2, 12.5)
    assert all(torch.equal(loaded.weights[name], weights[name]) for name in weights)
    assert load_checkpoint(tmp_path / "nothing-yet") is None

    torch.save({"round": 1, "model": {"w": Executable()}}, tmp_path / CHECKPOINT)
    with pytest.raises(ConfigError, match="is not a checkpoint fl-sim run wrote"):
        load_checkpoint(tmp_path)


def test_rewind_keeps_exactly_the_finished_rounds(tmp_path):
    for server_round in (1, 2, 3):
        append_jsonl(tmp_path / "global.jsonl", {"round": server_round, "accuracy": 0.1})
        for client in (0, 1):
            append_jsonl(tmp_path / "metrics.jsonl", {"round": server_round, "client": client, "status": "ok"})
            (tmp_path / client_folder(server_round, client)).mkdir(parents=True)
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"round": 3, "client": 2, "sta')  # a row torn by a kill
    (tmp_path / client_folder(1, 0) / ".truth.png.abc.tmp").write_bytes(b"half an image")

    rewind(tmp_path, 1)

    assert read_jsonl(tmp_path / "global.jsonl") == [{"round": 1, "accuracy": 0.1}]
    assert [(row["round"], row["client"]) for row in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 0), (1, 1)]
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-001"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_row_appended_after_a_torn_one_is_kept_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"round": 1})
    with open(path, "a") as file:
        file.write('{"round": 2, "cli')
    append_jsonl(path, {"round": 2, "client": 0})
    assert read_jsonl(path) == [{"round": 1}, {"round": 2, "client": 0}]


@pytest.fixture
def stopped_run(tmp_path, shared_data):
    """An output folder as `fl-sim run` leaves it when killed before round 1 finished."""
    out = tmp_path / "stopped"
    config = RunConfig(out="/elsewhere/not/here", rounds=3, num_clients=3, iterations=5, seed=4,
                       train_mode=TrainMode.STEPS, model="lenet", data_root=str(shared_data))
    write_json(out / "run.json", {"config": config.to_flower(), "seed": 4})
    return out


def parsed(*flags):
    return cli.parse_args(["run", *flags])


def test_resume_takes_the_runs_config_and_writes_only_into_its_folder(stopped_run, shared_data):
    config = run.check(parsed("--resume", str(stopped_run), "--seed", "4", "--device", "cpu"))
    assert (config.rounds, config.num_clients, config.iterations, config.seed) == (3, 3, 5, 4)
    assert config.out == str(stopped_run)  # not the out-dir run.json names
    assert config.device == "cpu"  # where it runs may change


def test_resume_refuses_flags_that_contradict_the_run(stopped_run, capsys):
    cases = {("--resume", str(stopped_run), "--rounds", "5"): "--rounds 5 conflicts with the run's 3 (run.json)",
             ("--resume", str(stopped_run), "--inject-faults", "0=nan"): "--inject-faults '0=nan' conflicts",
             ("--resume", str(stopped_run), "--out", "x"): "give --out for a new run, or --resume OUT",
             ("--resume", str(stopped_run.parent / "none")): "no run.json there, so no run to continue"}
    for flags, message in cases.items():
        assert cli.main(["run", *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (stopped_run / "global.jsonl").exists()


def attack_rows(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def test_resume_refuses_a_typed_flag_even_when_it_is_the_default(tmp_path, shared_data, capsys):
    """--lr 0.1 is the default, but typed against a run made with --lr 0.05 it contradicts the run."""
    out = tmp_path / "slow"
    config = RunConfig(out=str(out), rounds=3, num_clients=3, iterations=5, lr=0.05, data_root=str(shared_data))
    write_json(out / "run.json", {"config": config.to_flower(), "seed": 0})
    assert cli.main(["run", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "--lr 0.1 conflicts with the run's 0.05" in capsys.readouterr().err
    assert run.check(parsed("--resume", str(out), "--lr", "0.05")).lr == 0.05  # agreeing is fine


def test_a_run_killed_after_round_one_resumes_to_its_last_round(shared_data, tmp_path):
    out = tmp_path / "run"
    flags = ["run", "--train-mode", "steps", "--batch-size", "1", "--model", "lenet", "--dataset", "mnist",
             "--data-root", str(shared_data), "--num-clients", "3", "--rounds", "3",
             "--attack", "idlg", "--restarts", "1", "--iterations", "5", "--seed", "2", "--out", str(out)]
    fl_sim = Path(sys.executable).parent / "fl-sim"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    # Its own session: SIGKILL to the group takes Ray's processes (GCS, raylet, workers) down with it.
    process = subprocess.Popen([str(fl_sim), *flags], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_round_one(process, out)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_after = load_checkpoint(out).server_round
    assert killed_after < 3, "the run finished before it could be killed"
    before = [row for row in attack_rows(out) if row["round"] <= killed_after]

    assert cli.main(["run", "--resume", str(out)]) == 0

    rows = attack_rows(out)
    assert sorted((row["round"], row["client"]) for row in rows) == [(r, c) for r in (1, 2, 3) for c in range(3)]
    assert [row for row in rows if row["round"] <= killed_after] == before  # finished rounds were not redone
    assert all(row["status"] == "ok" for row in rows)
    assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1, 2, 3]
    assert load_checkpoint(out).server_round == 3
    record = json.loads((out / "run.json").read_text())
    assert record["finished"] and [entry["after_round"] for entry in record["resumed"]] == [killed_after]
    for row in rows:
        for image in ("truth.png", "reconstruction.png"):
            with Image.open(out / client_folder(row["round"], row["client"]) / image) as png:
                png.verify()
    assert not list(out.rglob("*.tmp"))
