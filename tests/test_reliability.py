"""Interrupts that stop, runs that cannot collide, resources and memory checked before a run, files that
are not ours left alone, and bad files that end in one line with exit code 2 (never a traceback or a hang)."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import wait_for_round_one

from fl_sim.commands import cli, guard, pretrain, sweep
from fl_sim.commands import run as run_command
from fl_sim.contract.protocol import TrainMode
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.results.outputs import read_jsonl, write_json
from fl_sim.server import lock
from fl_sim.server.resume import CHECKPOINT, Checkpoint, load_checkpoint, rewind, save_checkpoint

FL_SIM = Path(sys.executable).parent / "fl-sim"


def small_run(shared_data, out, *extra):
    return ["run", "--train-mode", "steps", "--dataset", "mnist", "--data-root", str(shared_data), "--model", "lenet",
            "--num-clients", "2", "--rounds", "3", "--batch-size", "1", "--attack", "idlg", "--restarts", "1",
            "--iterations", "2", "--seed", "3", "--out", str(out), *extra]


def session_processes(session: int) -> list[str]:
    """The processes still alive in a session (a run started with start_new_session: its Ray ones included)."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    alive = []
    for line in listing.splitlines():
        pid, sid, stat, *args = line.split(None, 3)
        if int(sid) == session and not stat.startswith("Z"):
            alive.append(f"{pid} {' '.join(args)[:100]}")
    return alive


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_interrupted_run_stops_within_seconds_and_resumes_with_nothing_doubled(shared_data, tmp_path, signum,
                                                                                    to_group, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    process = subprocess.Popen([str(FL_SIM), *small_run(shared_data, out)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        wait_for_round_one(process, out)
        sent = time.monotonic()
        if to_group:  # Ctrl-C in a terminal: the whole foreground group, Ray's processes too
            os.killpg(process.pid, signum)
        else:  # `kill PID`: the main process only
            os.kill(process.pid, signum)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("fl-sim run did not stop within 60 s of the signal")
        took = time.monotonic() - sent
        stderr = process.stderr.read()
        deadline = time.monotonic() + 15  # Ray's own processes end as their driver goes
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = session_processes(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 128 + signum, stderr[-3000:]
    assert took < 15, f"took {took:.1f} s to stop"
    assert not left, f"processes left behind: {left}"
    checkpoint = load_checkpoint(out)
    assert checkpoint is not None
    stopped_after = checkpoint.server_round
    assert stopped_after < 3, "the run finished before it could be interrupted"
    message = f"interrupted ({signal.Signals(signum).name}) after round {stopped_after}; continue with: " \
              f"fl-sim run --resume {out}"
    assert message in stderr
    assert "Traceback" not in stderr
    assert not (out / lock.LOCK_FILE).exists()
    before = [row for row in read_jsonl(out / "metrics.jsonl") if row["round"] <= stopped_after]

    assert cli.main(["run", "--resume", str(out)]) == 0

    rows = read_jsonl(out / "metrics.jsonl")
    assert sorted((row["round"], row["client"]) for row in rows) == [(r, c) for r in (1, 2, 3) for c in range(2)]
    assert [row for row in rows if row["round"] <= stopped_after] == before
    assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1, 2, 3]
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(out)]) == 0  # finished: nothing to do, nothing rewritten
    assert "finished all its 3 round(s) already; nothing to do" in capsys.readouterr().out


def test_an_interrupted_sweep_says_where_it_stopped_and_how_to_go_on(tmp_path, shared_data, monkeypatch, capsys):
    def interrupted_point(mode, point_args, folder):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal's handler raises before this ends
        raise AssertionError("SIGINT did not stop the sweep")

    monkeypatch.setattr(sweep, "run_point", interrupted_point)
    # the handler this process started with: Python's default_int_handler, or SIG_IGN when the suite was started
    # in the background of a non-interactive shell (`nohup ... &` ignores SIGINT for its children)
    before = signal.getsignal(signal.SIGINT)
    code = cli.main(["sweep", "--dataset", "mnist", "--data-root", str(shared_data), "--iterations", "1",
                     "--num-victims", "1", "--grid", "lr=0.1,0.2", "--out", str(tmp_path / "sweep")])
    assert code == 130
    assert "interrupted (SIGINT) at point 1 of 2 (lr=0.1); the finished points are kept: continue with the " \
           "same fl-sim sweep command" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are given back


@pytest.fixture
def stopped_run(tmp_path, shared_data) -> Path:
    """A run folder as a run killed after round 1 leaves it: run.json, a checkpoint, round 1's rows."""
    out = tmp_path / "stopped"
    config = RunConfig(out=str(out), rounds=3, num_clients=2, iterations=2, seed=4, train_mode=TrainMode.STEPS,
                       batch_size=1, model="lenet", data_root=str(shared_data))
    write_json(out / "run.json", {"config": config.to_flower(), "seed": 4})
    weights = build_model("lenet", 1, 28, 10).state_dict()
    save_checkpoint(out, Checkpoint(1, weights, 1.0))
    return out


def test_a_second_writer_is_refused_naming_the_holder(stopped_run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fl_sim.server import lock; "
                               f"lock.acquire({str(stopped_run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert cli.main(["run", "--resume", str(stopped_run)]) == 2
        assert time.monotonic() - started < 60
        err = capsys.readouterr().err
        assert f"is being written by pid {holder.pid} on " in err
        assert "wait for that run to end, or stop it" in err
    finally:
        holder.kill()
        holder.wait()
    assert not (stopped_run / "global.jsonl").exists()  # the refused writer wrote nothing
    lock.acquire(stopped_run)  # a killed holder's lock is free at once (the OS drops it)
    lock.release(stopped_run)
    assert not (stopped_run / lock.LOCK_FILE).exists()


def test_the_lock_is_taken_once_per_folder_and_reentrant_in_its_process(tmp_path):
    with lock.hold(tmp_path):
        with lock.hold(tmp_path):  # the ServerApp, in the process of fl-sim run
            assert (tmp_path / lock.LOCK_FILE).exists()
        other = subprocess.run([sys.executable, "-c", "from fl_sim.server import lock; "
                                f"lock.acquire({str(tmp_path)!r})"], capture_output=True, text=True)
        assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr
        assert (tmp_path / lock.LOCK_FILE).exists()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_resources_the_machine_lacks_are_refused_before_anything_is_written(shared_data, tmp_path, capsys):
    cases = [(("--client-cpus", str(guard.cpu_cores() + 6)), f"this machine has {guard.cpu_cores()} CPU core(s)")]
    if not torch.cuda.is_available():
        cases += [(("--client-gpus", "1"), "--client-gpus 1: this machine has no CUDA GPU"),
                  (("--device", "cuda"), "--device cuda: this machine has no CUDA GPU")]
    else:
        gpus = torch.cuda.device_count()
        cases += [(("--client-gpus", str(gpus + 1)), f"this machine has {gpus} GPU(s)"),
                  (("--device", f"cuda:{gpus}"), f"this machine has {gpus} GPU(s)")]
    for flags, message in cases:
        out = tmp_path / "run"
        started = time.monotonic()
        assert cli.main(small_run(shared_data, out, *flags)) == 2, flags
        assert message in capsys.readouterr().err
        assert time.monotonic() - started < 60
        assert not out.exists(), flags  # no folder, so a corrected run is not refused


def test_memory_the_machine_lacks_is_refused_with_the_flag_that_lowers_it(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(guard, "available_memory", lambda: 2 * 2**30)
    flags = small_run(shared_data, tmp_path / "run", "--attack", "imprint", "--imprint-bins", "100000")
    assert cli.main(flags) == 2
    err = capsys.readouterr().err
    assert "but the machine has 2.0 GiB free: lower --imprint-bins" in err
    needed = float(err.split("needs about ")[1].split(" GiB")[0])
    per_copy = (100000 * 784 + 100000) * 4  # the imprint matrix and its bias, float32
    assert needed * 2**30 >= per_copy * (4 + 2 * 2 + 5)  # the models and replies of 2 clients, 1 worker at least
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(guard, "available_memory", lambda: 5 * 2**30)
    run_command.check(cli.parse_args(small_run(shared_data, tmp_path / "ok")))  # a small run fits in 5 GiB
    monkeypatch.setattr(guard, "available_memory", lambda: 2 * 2**30)
    assert cli.main(["attack", "--dataset", "mnist", "--data-root", str(shared_data), "--attack", "imprint",
                     "--imprint-bins", "100000", "--num-victims", "4", "--out", str(tmp_path / "attack")]) == 2
    err = capsys.readouterr().err
    assert "(4 victim(s), 300 MiB per copy of the model" in err
    assert "but the machine has 2.0 GiB free: lower --imprint-bins" in err


def test_run_and_sweep_leave_a_folder_they_did_not_write_alone(shared_data, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "gallery.html").write_text("<p>my own page</p>")
    (mine / "metrics.jsonl").write_text('{"my": "row"}\n')
    assert cli.main(small_run(shared_data, mine)) == 2
    assert "holds gallery.html, metrics.jsonl, which fl-sim run did not write (no run.json)" in capsys.readouterr().err
    assert cli.main(["sweep", "--dataset", "mnist", "--data-root", str(shared_data), "--iterations", "1",
                     "--num-victims", "1", "--grid", "lr=0.1", "--out", str(mine)]) == 2
    assert "which fl-sim sweep did not write (no sweep.json)" in capsys.readouterr().err
    assert (mine / "gallery.html").read_text() == "<p>my own page</p>"
    assert (mine / "metrics.jsonl").read_text() == '{"my": "row"}\n'
    assert sorted(path.name for path in mine.iterdir()) == ["gallery.html", "metrics.jsonl"]


def test_pretrain_replaces_no_file_and_writes_no_folder(shared_data, tmp_path, capsys):
    base = ["pretrain", "--dataset", "mnist", "--data-root", str(shared_data), "--train-examples", "64",
            "--epochs", "1"]
    existing = tmp_path / "ckpt.pt"
    existing.write_bytes(b"the user's own file")
    assert cli.main([*base, "--out", str(existing)]) == 2
    assert "exists already; choose a new name" in capsys.readouterr().err
    assert existing.read_bytes() == b"the user's own file"
    assert cli.main([*base, "--out", str(tmp_path)]) == 2
    assert "is a folder; give the checkpoint's file name" in capsys.readouterr().err


def test_an_output_inside_the_data_is_refused(tiny_image_folder, tmp_path, capsys):
    for command in (["run", "--num-clients", "2", "--train-mode", "steps", "--batch-size", "1"],
                    ["attack", "--num-victims", "1"],
                    ["pretrain"]):
        out = tiny_image_folder / "results" / ("ckpt.pt" if command[0] == "pretrain" else "")
        assert cli.main([*command, "--dataset", "imagefolder", "--data-root", str(tiny_image_folder),
                         "--out", str(out)]) == 2, command
        assert "lies inside the data folder" in capsys.readouterr().err
        assert not (tiny_image_folder / "results").exists()
    assert load_dataset("imagefolder", tiny_image_folder).num_classes == 3


def test_a_damaged_committed_line_stops_the_resume_with_its_line_number(tmp_path):
    out = tmp_path
    rows = [{"round": r, "client": c, "status": "ok"} for r in (1, 2) for c in range(3)]
    lines = [json.dumps(row) for row in rows]
    lines[1] = lines[1][:25]  # cut short inside the file, then more rows: damage, not a kill
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"metrics\.jsonl' line 2 is damaged"):
        rewind(out, 2)
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing rewritten
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + '\n{"round": 3, "cli')
    rewind(out, 1)  # only a torn last line (a kill mid-append, no newline) is dropped, with the later rounds
    assert read_jsonl(out / "metrics.jsonl") == rows[:3]


def test_a_damaged_committed_line_is_said_by_fl_sim_run_resume(stopped_run, capsys):
    (stopped_run / "global.jsonl").write_text('{"round": 1, "accuracy": 0.1}\nnot json\n')
    before = (stopped_run / "global.jsonl").read_bytes()
    assert cli.main(["run", "--resume", str(stopped_run)]) == 2
    assert "global.jsonl' line 2 is damaged" in capsys.readouterr().err
    assert (stopped_run / "global.jsonl").read_bytes() == before


def test_a_sweep_over_other_keys_is_refused_naming_the_grid_the_folder_holds(tmp_path, shared_data, capsys):
    out = tmp_path / "sweep"
    write_json(out / "sweep.json", {"mode": "attack", "grid": {"batch-size": ["1", "2"]}, "points": []})
    flags = ["sweep", "--dataset", "mnist", "--data-root", str(shared_data), "--iterations", "1",
             "--num-victims", "1", "--out", str(out)]
    assert cli.main([*flags, "--grid", "lr=0.1,0.2"]) == 2
    assert 'holds a sweep over --grid "batch-size=1,2", not over lr' in capsys.readouterr().err
    assert not (out / "points").exists()
    assert sweep.check(cli.parse_args([*flags, "--grid", "batch-size=1,4"]))  # more values of its keys: fine


def corrupt_images(root: Path, classes: tuple[str, ...]) -> None:
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(3):
            (root / label / f"{i}.png").write_bytes(b"not a png at all")


def test_bad_data_files_end_in_one_line_naming_the_file(tmp_path, shared_data, capsys):
    corrupt_images(tmp_path / "corrupt", ("a", "b"))
    one_class = tmp_path / "one"
    (one_class / "only").mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one_class / "only" / "0.png")
    truncated = tmp_path / "truncated" / "MNIST" / "raw"
    truncated.mkdir(parents=True)
    for source in (shared_data / "MNIST" / "raw").iterdir():
        data = source.read_bytes()
        (truncated / source.name).write_bytes(data[:len(data) // 3] if "train-images" in source.name else data)
    cases = {("imagefolder", tmp_path / "corrupt"): "a/0.png' is not an image that can be read",
             ("imagefolder", one_class): "holds one class ('only'): a classifier needs at least two",
             ("mnist", tmp_path / "truncated"): "is there but cannot be read",
             ("mnist", tmp_path / "no" / "such" / "root"): "(no such folder) and could not be downloaded"}
    for (dataset, root), message in cases.items():
        out = tmp_path / "out"
        assert cli.main(["run", "--dataset", dataset, "--data-root", str(root), "--num-clients", "2",
                         "--out", str(out)]) == 2, root
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert not (tmp_path / "no").exists()  # a mistyped root is never created


def test_an_init_that_is_no_checkpoint_of_this_model_is_refused_in_one_line(tmp_path, shared_data, capsys):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("just some text")
    code_inside = tmp_path / "pickle.pt"
    torch.save({"weights": Path("/etc")}, code_inside)  # any object other than tensors: weights_only refuses it
    other_model = tmp_path / "cnn.pt"
    torch.save(build_model("cnn", 1, 28, 10).state_dict(), other_model)
    cases = {not_a_checkpoint: "is not a checkpoint of weights", code_inside: "is not a checkpoint of weights",
             other_model: "holds the weights of another model"}
    for path, message in cases.items():
        assert cli.main(small_run(shared_data, tmp_path / "out", "--init", str(path))) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err
        assert "weights_only=False" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_a_damaged_record_under_report_is_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"config": {"rounds": 3')
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "run.json' is damaged (JSONDecodeError" in capsys.readouterr().err
    (tmp_path / "run.json").unlink()
    (tmp_path / "sweep.json").write_text('["not", "a", "record"]')
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "sweep.json' is not a record fl-sim wrote" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_exit_code_2(tmp_path, shared_data, monkeypatch, capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pretrain, "atomic_write_bytes", full)
    out = tmp_path / "ckpt.pt"
    assert cli.main(["pretrain", "--dataset", "mnist", "--data-root", str(shared_data), "--train-examples", "64",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"No space left on device writing {str(out)!r}: free space" in err and len(err.strip().splitlines()) == 1


def test_run_json_keeps_an_absolute_data_root(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(shared_data.parent)
    config = run_command.check(cli.parse_args(small_run(Path(shared_data.name), tmp_path / "run")))
    assert config.data_root == str(shared_data.resolve())


def test_a_full_disk_during_a_run_is_one_line_and_the_run_resumes(shared_data, tmp_path, monkeypatch, capfd):
    from fl_sim.server import resume as commits

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(commits, "atomic_write_bytes", full)  # round 1's checkpoint cannot be written
    out = tmp_path / "run"
    assert cli.main(small_run(shared_data, out, "--attack", "none")) == 2
    err = capfd.readouterr().err
    assert f"No space left on device writing {str(out / CHECKPOINT)!r}: free space (or write elsewhere) and run " \
           "the command again with --resume" in err
    assert "Traceback" not in err
    assert not (out / lock.LOCK_FILE).exists()
    monkeypatch.undo()
    assert cli.main(["run", "--resume", str(out)]) == 0
    assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1, 2, 3]
