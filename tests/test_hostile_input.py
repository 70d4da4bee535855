"""Bad settings, unreachable services, damaged files and interruptions, tried as a careless or hostile user would:
each ends in one clear line (exit 2 where it is the user's input) or in the right result, with nothing lost."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_helpers import flwr_env, superlinks_of

ROOT = Path(__file__).resolve().parents[1]
FL_SIM = Path(sys.executable).parent / "fl-sim"
FLWR = Path(sys.executable).parent / "flwr"


@pytest.mark.parametrize("override, message", [
    ("num-server-rounds=-1", "num-server-rounds must be at least 1, got -1"),
    ("attack='nope'", "unknown attack 'nope': choose one of"),
])
def test_flwr_run_with_a_bad_setting_ends_failed_naming_the_run_config_key(tmp_path, shared_data, override, message):
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = flwr_env(home)
    overrides = f"{override} out-dir='{out}' data-root='{shared_data}'"
    try:
        started = subprocess.run([str(FLWR), "run", ".", "-c", overrides], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        deadline, run = time.monotonic() + 180, {}
        while time.monotonic() < deadline:
            listed = subprocess.run([str(FLWR), "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=60)
            run = json.loads(listed.stdout)["runs"][0]
            if run["status"].startswith("finished"):
                break
            time.sleep(1)
        logs = subprocess.run([str(FLWR), "log", run["run-id"], "--show"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60).stdout
    finally:
        for pid in superlinks_of(home):
            os.kill(pid, signal.SIGTERM)
    assert run["status"] == "finished:failed", run
    assert message in run["status-details"], run["status-details"]
    assert "--" not in run["status-details"], "a CLI flag named under flwr run"
    # the last line the run says, after Flower's exit report (only Flower's DEBUG line of its exit follows)
    said = [line for line in logs.splitlines() if line.strip() and ":DEBUG:" not in line]
    assert message in said[-1], said[-8:]
    assert not (out / "global.jsonl").exists(), "a round ran"


def small_run(shared_data, out, *extra) -> list[str]:
    return [str(FL_SIM), "run", "--train-mode", "steps", "--dataset", "mnist", "--data-root", str(shared_data),
            "--model", "lenet", "--num-clients", "2", "--rounds", "1", "--batch-size", "1", "--attack", "idlg",
            "--restarts", "1", "--iterations", "2", "--seed", "3", "--out", str(out), *extra]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_unreachable_ray_address_is_refused_within_30_s_naming_it(shared_data, tmp_path, how):
    flag = ["--ray-address", "127.0.0.1:1"] if how == "flag" else []
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"} if how == "environment" else os.environ
    started = time.monotonic()
    try:
        done = subprocess.run(small_run(shared_data, tmp_path / "out", *flag), env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("fl-sim run waited for the Ray cluster at 127.0.0.1:1 for a minute")
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0], done.stderr[-2000:]
    assert ("--ray-address" if how == "flag" else "RAY_ADDRESS") in lines[0]
    assert seconds < 30, f"refused after {seconds:.0f} s"
    assert not (tmp_path / "out").exists()


def damaged_run(tmp_path) -> Path:
    from fl_sim.results.outputs import write_json

    out = tmp_path / "run"
    out.mkdir()
    write_json(out / "run.json", {"config": {"model": "lenet"}})
    rows = [{"round": r, "client": c, "psnr": 33.0, "status": "ok"} for r in (1, 2) for c in (0, 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "global.jsonl").write_text("".join(json.dumps({"round": r, "accuracy": 0.5, "loss": 1.0}) + "\n"
                                              for r in (1, 2)))
    return out


def test_report_names_a_damaged_row_and_exits_non_zero(tmp_path, capsys):
    from fl_sim.commands.cli import main

    out = damaged_run(tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "garbage {not json\n"
    (out / "metrics.jsonl").write_text("".join(lines))
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'} line 2: not JSON" in err, err
    assert (out / "gallery.html").is_file(), "the page is still rebuilt from what could be read"


def test_report_names_binary_garbage_in_global_jsonl(tmp_path, capsys):
    from fl_sim.commands.cli import main

    out = damaged_run(tmp_path)
    (out / "global.jsonl").write_bytes(b"\x00\xff\xfe garbage\x89\n" + (out / "global.jsonl").read_bytes())
    assert main(["report", str(out)]) == 2
    assert f"{out / 'global.jsonl'} line 1: not text" in capsys.readouterr().err


def test_report_names_a_torn_last_line_even_though_it_skips_it(tmp_path, capsys):
    from fl_sim.commands.cli import main

    out = damaged_run(tmp_path)
    with open(out / "metrics.jsonl", "a") as rows:
        rows.write('{"round": 3, "client": 0, "ps')
    assert main(["report", str(out)]) == 0  # what a kill mid-append leaves: the run's rows are whole
    assert f"{out / 'metrics.jsonl'} line 5: torn" in capsys.readouterr().err


def test_report_of_a_sweep_names_a_point_it_cannot_read(tmp_path, capsys):
    from fl_sim.commands.cli import main
    from fl_sim.results.outputs import write_json

    out = tmp_path / "sweep"
    points = [{"folder": f"p{i}", "settings": {"lr": str(i)}} for i in (1, 2)]
    write_json(out / "sweep.json", {"grid": {"lr": ["1", "2"]}, "points": points, "mode": "attack"})
    write_json(out / "points" / "p1" / "summary.json", {"psnr_median": 30.0})
    (out / "points" / "p2").mkdir(parents=True)
    (out / "points" / "p2" / "summary.json").write_bytes(b"\x00garbage")
    assert main(["report", str(out)]) == 2
    assert f"{out / 'points' / 'p2' / 'summary.json'}: cannot be read" in capsys.readouterr().err


def test_resume_names_every_row_it_drops_and_why(tmp_path):
    from fl_sim.results.gallery import client_folder
    from fl_sim.results.outputs import append_jsonl, read_jsonl
    from fl_sim.server.resume import rewind

    for server_round in (1, 2, 3):
        append_jsonl(tmp_path / "global.jsonl", {"round": server_round, "accuracy": 0.1})
        for client in (0, 1):
            append_jsonl(tmp_path / "metrics.jsonl", {"round": server_round, "client": client, "status": "ok"})
            (tmp_path / client_folder(server_round, client)).mkdir(parents=True)
    with open(tmp_path / "global.jsonl", "a") as file:
        file.write('{"round": 2, "accur')  # a row of a finished round, torn
    dropped = rewind(tmp_path, 2)
    assert [(row["round"], row["client"]) for row in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(dropped) == [
        "global.jsonl line 4: torn (a write cut short), dropped; it held a row of round 2, which had finished: "
        "that row is lost",
        "global.jsonl: the row of round 3 dropped: the checkpoint names round 2, so round 3 runs again",
        "metrics.jsonl: the row of round 3, client 0 dropped: the checkpoint names round 2, so round 3 runs again",
        "metrics.jsonl: the row of round 3, client 1 dropped: the checkpoint names round 2, so round 3 runs again",
        "round-003/ removed: round 3 runs again"], dropped


# Peaks measured (the summed RSS of fl-sim run's processes, sampled every 0.1 s) for `fl-sim run --model lenet
# --num-clients 2 --rounds 1 --imprint-bins ROWS` on MNIST with 2 cores: 4.1 GB at the default 256 rows,
# 6.1 GB at 25000 rows, and 9.4 GB at 100000 rows.
@pytest.mark.parametrize("rows, measured_gb", [(256, 4.1), (25000, 6.1), (100000, 9.4)])
def test_the_memory_estimate_is_within_1_5x_of_the_measured_peak(rows, measured_gb):
    from fl_sim.commands import guard

    estimate = guard.run_memory(guard.model_bytes("lenet", (1, 28, 28), 10, rows), 2, 2)
    assert measured_gb * 1e9 <= 1.5 * estimate, f"{estimate / 1e9:.1f} GB estimated"
    assert estimate <= 1.5 * measured_gb * 1e9, f"{estimate / 1e9:.1f} GB estimated"


@pytest.mark.parametrize("dataset, pixels", [("mnist", 784), ("cifar10", 3 * 32 * 32)])
def test_the_memory_check_counts_the_imprint_block_on_every_data_set(shared_data, tmp_path, monkeypatch, dataset,
                                                                     pixels):
    from fl_sim.commands import attack, cli, guard
    from fl_sim.commands import run as run_command

    asked = []
    monkeypatch.setattr(guard, "check_memory", lambda copy_bytes, *args, **kwargs: asked.append(copy_bytes) or 0)
    run_command.check(cli.parse_args(["run", "--dataset", dataset, "--data-root", str(shared_data), "--model",
                                      "lenet", "--attack", "imprint", "--imprint-bins", "1000",
                                      "--out", str(tmp_path / "run")]))
    with pytest.raises(SystemExit):  # the check passed (stubbed); stopped before the attack runs
        monkeypatch.setattr(attack, "clear_out", lambda out: sys.exit(0))
        attack.run(cli.parse_args(["attack", "--dataset", dataset, "--data-root", str(shared_data), "--model",
                                   "lenet", "--attack", "imprint", "--imprint-bins", "1000",
                                   "--out", str(tmp_path / "attack")]))
    assert len(asked) == 2 and all(copy >= 1000 * pixels * 4 for copy in asked), asked


def test_fl_sim_attack_under_an_address_space_limit_is_refused_in_one_line(shared_data, tmp_path):
    import resource

    limit = 8 * 2**30

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([str(FL_SIM), "attack", "--dataset", "mnist", "--data-root", str(shared_data), "--attack",
                           "imprint", "--imprint-bins", "100000", "--num-victims", "2", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "GiB free: lower --imprint-bins" in lines[0], done.stderr[-2000:]


def test_a_run_above_2_gb_prints_its_estimate(shared_data, tmp_path, capsys):
    from fl_sim.commands import cli
    from fl_sim.commands import run as run_command

    run_command.check(cli.parse_args(small_run(shared_data, tmp_path / "run", "--attack", "imprint",
                                               "--imprint-bins", "20000")[1:]))
    printed = capsys.readouterr().out
    assert "fl-sim run: memory estimate about" in printed and "GiB free" in printed, printed


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_image_in_the_middle_of_an_image_folder_is_refused_before_round_1(tiny_image_folder, tmp_path,
                                                                                     capsys, damage):
    from fl_sim.commands import cli

    victim = tiny_image_folder / "b" / "3.png"
    data = victim.read_bytes()
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 if damage == "garbage" else data[:len(data) - 30])
    out = tmp_path / "out"
    for command in (["run", "--num-clients", "2", "--rounds", "1", "--min-shard", "1"],
                    ["attack", "--num-victims", "1"]):
        assert cli.main([*command, "--dataset", "imagefolder", "--data-root", str(tiny_image_folder), "--model",
                         "lenet", "--attack", "idlg", "--train-mode", "steps", "--batch-size", "2", "--out",
                         str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{str(victim)!r} is not an image that can be read" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_mosaic_too_small_for_its_clients_is_refused_before_ray_starts_naming_the_rows_to_pass(shared_data,
                                                                                                 tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([str(FL_SIM), "run", "--data-root", str(shared_data), "--attack", "mosaic", "--num-clients",
                           "100", "--train-mode", "fedsgd", "--imprint-bins", "256", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    said = ("fl-sim run: --attack mosaic: 256 imprint rows cannot give 100 clients a round 4 blocks of 2 or more bins "
            "each: pass --imprint-bins 800 or more, or leave it out to size the block for the round")
    assert done.stderr.strip() == said, done.stderr[-3000:]
    assert "Ray" not in done.stdout + done.stderr and not out.exists()


def test_the_mosaic_refusal_names_rows_that_the_attack_then_accepts(shared_data):
    from fl_sim.contract.run_config import ConfigError, RunConfig

    for steps in (1, 3):
        config = RunConfig(attack="mosaic", num_clients=40, train_mode="steps", local_steps=steps, imprint_bins=8)
        with pytest.raises(ConfigError, match=f"pass --imprint-bins {2 * 4 * 40} or more"):
            config.check()
        RunConfig(attack="mosaic", num_clients=40, train_mode="steps", local_steps=steps,
                  imprint_bins=2 * 4 * 40).check()


def test_a_second_sweep_into_the_same_folder_is_refused_naming_the_first(tmp_path, shared_data, monkeypatch,
                                                                          capsys):
    from fl_sim.commands import cli, sweep

    out = tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fl_sim.server import lock; "
                               f"lock.acquire({str(out)!r}, 'fl-sim sweep'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    ran = []
    monkeypatch.setattr(sweep, "run_point", lambda *args: ran.append(args) or {"seconds": 0.0})
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli.main(["sweep", "--dataset", "mnist", "--data-root", str(shared_data), "--iterations", "1",
                         "--num-victims", "1", "--grid", "lr=0.1,0.2", "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and not ran
    assert f"is being written by pid {holder.pid}" in capsys.readouterr().err
    assert cli.main(["sweep", "--dataset", "mnist", "--data-root", str(shared_data), "--iterations", "1",
                     "--num-victims", "1", "--grid", "lr=0.1,0.2", "--out", str(out)]) == 0  # once it is gone
    assert len(ran) == 2


def test_resume_of_a_checkpoint_of_random_bytes_is_one_line(tmp_path, shared_data):
    from fl_sim.contract.run_config import RunConfig
    from fl_sim.results.outputs import write_json
    from fl_sim.server.resume import CHECKPOINT

    out = tmp_path / "stopped"
    config = RunConfig(out=str(out), rounds=3, num_clients=2, iterations=2, model="lenet", data_root=str(shared_data))
    write_json(out / "run.json", {"config": config.to_flower(), "seed": 0})
    (out / CHECKPOINT).write_bytes(random.Random(0).randbytes(4096))  # torch's reason for these: 6 lines
    done = subprocess.run([str(FL_SIM), "run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a checkpoint fl-sim run wrote" in lines[0], done.stderr[-3000:]


def test_ctrl_c_during_a_sweep_while_clients_train_prints_no_traceback(shared_data, tmp_path):
    """Ctrl-C signals the whole foreground group: the clients' Ray actors die mid-task as the sweep stops."""
    out = tmp_path / "sweep"
    command = [str(FL_SIM), "sweep", "--mode", "run", "--train-mode", "steps", "--local-steps", "300", "--dataset",
               "mnist", "--data-root", str(shared_data), "--model", "cnn", "--num-clients", "2", "--rounds", "3",
               "--batch-size", "16", "--attack", "none", "--grid", "lr=0.1,0.2", "--out", str(out)]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("points/*/checkpoint.pt")):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not finish in 300 s"
            time.sleep(0.05)
        time.sleep(2)  # round 2: the clients train (300 steps each)
        os.killpg(process.pid, signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("fl-sim sweep: interrupted (SIGINT) at point 1 of 2")


def test_the_rounds_plot_draws_the_clients_of_every_round_at_once(tmp_path, monkeypatch):
    """The gallery's rounds plot is redrawn after every round: a draw per round made each rebuild of a run of
    hundreds of rounds seconds longer (benchmarks/soak.py)."""
    from matplotlib.axes import Axes

    from fl_sim.results.plots import plot_rounds
    from fl_sim.results.rows import MetricsRow

    calls = []
    scatter = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, *args, **kwargs: calls.append(len(args[0]))
                        or scatter(self, *args, **kwargs))
    rows = [MetricsRow.from_json({"round": r, "client": c, "status": "ok", "psnr": 40.0, "images": 2,
                                  "recovered_at_30db": 1, "recovered_at_40db": 1})
            for r in range(1, 201) for c in range(3)]
    assert plot_rounds(rows, {r: 0.5 for r in range(1, 201)}, tmp_path / "rounds.png", passive=False)
    assert calls == [600], calls
