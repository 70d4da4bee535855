"""`fl-sim run` end to end on a real (small) Flower simulation, its config in both forms, and bad input."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flwr
import pytest
from flower_helpers import live_commands

from fl_sim.commands import cli
from fl_sim.commands import run as run_module
from fl_sim.commands.config import ConfigError
from fl_sim.contract.defenses import DefenseKind
from fl_sim.contract.faults import Fault
from fl_sim.contract.names import StrategyName
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import load_dataset
from fl_sim.learning.partition import partition_indices, round_examples
from fl_sim.results.outputs import read_jsonl
from fl_sim.server.flower_private import load_and_validate
from fl_sim.server.server_app import wait_for_clients

ROOT = Path(__file__).resolve().parents[1]


def run_flags(shared_data, out, *extra):
    return ["run", "--train-mode", "steps", "--dataset", "mnist", "--data-root", str(shared_data), "--model", "lenet",
            "--num-clients", "2",
            "--rounds", "2", "--local-steps", "1", "--batch-size", "1", "--attack", "idlg", "--restarts", "1",
            "--iterations", "5", "--seed", "1", "--out", str(out),
            "--max-shard", "0", "--epochs", "1", "--lr", "0.1", "--momentum", "0", *extra]  # not the demo-like defaults


def test_a_small_simulation_writes_every_output(shared_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(run_flags(shared_data, out)) == 0
    assert ("2 round(s), 4 client update(s): 4 attacked (4 with images recovered at >= 30 dB, 0 without, 0 failed), "
            "0 skipped (not read by the attack), 0 left out (faulty replies)") in capsys.readouterr().out

    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["seed"] == 1 and run["config"]["num-clients"] == 2
    assert run["versions"]["flwr"] == flwr.__version__

    global_rows = read_jsonl(out / "global.jsonl")
    assert [row["round"] for row in global_rows] == [1, 2]
    assert all(0 <= row["accuracy"] <= 1 and row["loss"] > 0 for row in global_rows)

    rows = read_jsonl(out / "metrics.jsonl")
    assert sorted((row["round"], row["client"]) for row in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    train = load_dataset("mnist", shared_data, train=True)
    partitions = partition_indices(train.labels, 2, seed=1)
    gallery = (out / "gallery.html").read_text()
    for row in rows:
        assert row["status"] == "ok" and row["psnr"] > 30 and row["label_acc"] == 1.0, row
        assert row["update_norm"] > 0, row
        _, labels = train.tensors(round_examples(partitions[row["client"]], 1, 1, row["client"], row["round"]))
        assert row["true_labels"] == labels.tolist()
        folder = f"round-{row['round']:03d}/client-{row['client']:03d}"
        for image in ("truth.png", "reconstruction.png"):
            assert (out / folder / image).stat().st_size > 0
            assert f"{folder}/{image}" in gallery
    assert (out / "leakage-by-round.png").stat().st_size > 0 and "leakage-by-round.png" in gallery


def test_fedprox_runs_wrapped_and_a_run_that_aggregates_nothing_fails_with_code_3(shared_data, tmp_path, capsys):
    out = tmp_path / "fedprox"
    # IG (boxed): unboxed iDLG's rows on these K = 2 updates now leave the pixel range and count as diverged
    assert cli.main(run_flags(shared_data, out, "--strategy", "fedprox", "--proximal-mu", "0.1",
                              "--local-steps", "2", "--attack", "ig")) == 0
    assert json.loads((out / "run.json").read_text())["config"]["strategy"] == "fedprox"
    assert all(row["status"] == "ok" for row in read_jsonl(out / "metrics.jsonl"))
    assert all(row["model_changed"] for row in read_jsonl(out / "global.jsonl"))

    broken = tmp_path / "broken"  # every client sends NaN: nothing is aggregated, the model never changes
    assert cli.main(run_flags(shared_data, broken, "--inject-faults", "0=nan,1=nan")) == 3
    assert "FAILED: no round aggregated any reply" in capsys.readouterr().out.strip().splitlines()[-1]


def test_bad_flags_fail_before_the_simulation_with_one_sentence(shared_data, tmp_path, capsys):
    cases = {
        ("--attack-clients", "5"): "--attack-clients [5] are not clients 0..1",
        ("--attack-every", "0"): "--attack-every must be at least 1",
        ("--alpha", "0"): "--alpha must be positive",
        ("--attack", "guess"): "unknown attack 'guess'",
        ("--model", "vgg"): "unknown model 'vgg'",
        ("--dataset", "svhn"): "unknown dataset 'svhn'",
        ("--lr", "0"): "--lr must be positive, got 0.0",
        ("--lr", "nan"): "--lr must be a finite number, got nan",
        ("--local-steps", "0"): "--local-steps must be at least 1, got 0",
        ("--iterations", "0"): "--iterations must be at least 1, got 0",
        ("--inject-faults", "0=melt"): "unknown fault 'melt'",
        ("--inject-faults", "2=nan"): "--inject-faults names [2], not clients 0..1",
        ("--defense", "prune:1.5"): "prune needs P, a fraction in [0, 1)",
        ("--defense", "secagg", "--attack-clients", "0"): "--attack-clients cannot pick clients under secure",
        ("--proximal-mu", "0.1"): "--proximal-mu is FedProx's: use it with --strategy fedprox, not fedavg",
        ("--strategy", "fedadam", "--server-lr", "0"): "--server-lr must be positive",
    }
    for extra, message in cases.items():
        assert cli.main(run_flags(shared_data, tmp_path / "bad", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    (tmp_path / "a-file").write_text("")
    assert cli.main(run_flags(shared_data, tmp_path / "a-file" / "run")) == 2
    assert "output folder" in capsys.readouterr().err


def test_partitions_too_small_for_a_round_are_refused(shared_data, tmp_path, capsys):
    flags = run_flags(shared_data, tmp_path / "bad")
    flags[flags.index("--batch-size") + 1] = "500"
    flags[flags.index("--num-clients") + 1] = "40"
    assert cli.main(flags) == 2
    assert "hold fewer examples than a round's K x B = 500" in capsys.readouterr().err
    assert cli.main(flags + ["--partition", "dirichlet", "--alpha", "0.001"]) == 2
    assert "raise alpha or use fewer clients" in capsys.readouterr().err


def test_an_output_folder_holding_a_run_is_not_mixed_with_a_new_one(shared_data, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "run.json").write_text("{}")
    assert cli.main(run_flags(shared_data, tmp_path / "used")) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_missing_data_is_said_before_the_simulation(tmp_path, capsys):
    flags = run_flags(tmp_path / "nowhere", tmp_path / "out")
    assert cli.main(flags) == 2
    assert "mnist is not under" in capsys.readouterr().err


def test_the_flower_app_config_in_pyproject_is_valid_and_names_every_setting():
    config, _ = load_and_validate(ROOT / "pyproject.toml")
    table = config["tool"]["flwr"]["app"]["config"]
    assert set(table) == set(RunConfig().to_flower())
    parsed = RunConfig.from_flower(table)
    assert parsed.to_flower() == table
    assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "fl_sim.server.server_app:app",
                                                           "clientapp": "clients.app:app"}


def test_run_config_round_trips_and_rejects_unknown_keys():
    config = RunConfig(rounds=3, attack_clients=(0, 2), restarts=None, data_root=None, no_replay=True)
    assert RunConfig.from_flower(config.to_flower()) == config
    assert RunConfig.from_flower({"attack-clients": "2,0", "num-server-rounds": 7}).attack_clients == (0, 2)
    with pytest.raises(ConfigError, match="unknown run-config key"):
        RunConfig.from_flower({"num-rounds": 3})


@pytest.mark.parametrize("values,message", [
    ({"local-steps": 1.5}, "--local-steps must be an integer, got 1.5"),
    ({"local-steps": True}, "--local-steps must be an integer, got True"),
    ({"lr": "fast"}, "--lr must be a number, got 'fast'"),
    ({"no-replay": "yes"}, "--no-replay must be true or false, got 'yes'"),
    ({"strategy": "krum"}, "--strategy must be one of fedavg, fedprox, fedadam, fedyogi, got 'krum'"),
    ({"batchnorm": "off"}, "--batchnorm must be one of train, frozen, got 'off'"),
    ({"dataset": 3}, "--dataset must be text, got 3"),
    ({"defense": "blur"}, "'blur' is not a defense"),
])
def test_flowers_run_config_is_parsed_into_types_with_one_sentence_for_a_wrong_one(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flower(values)
    assert message in str(error.value)


def test_flags_and_flowers_run_config_give_the_same_typed_config():
    from_flags = run_module.config_from_flags(cli.parse_args(
        ["run", "--out", "o", "--local-steps", "3", "--lr", "0.5", "--defense", "clip:4+noise:0.01",
         "--strategy", "fedprox", "--proximal-mu", "0.1", "--inject-faults", "1=nan", "--attack-clients", "0,1"]))
    from_flower = RunConfig.from_flower({"out-dir": "o", "local-steps": 3, "lr": 0.5, "defense": "clip:4+noise:0.01",
                                         "strategy": "fedprox", "proximal-mu": 0.1, "inject-faults": "1=nan",
                                         "attack-clients": "0,1"})
    assert from_flags == from_flower
    assert from_flags.local_steps == 3 and from_flags.strategy == StrategyName.FEDPROX
    assert from_flags.defense.steps[0] == (DefenseKind.CLIP, 4.0) and from_flags.inject_faults == {1: Fault.NAN}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def superlinks_of(flwr_home: Path) -> list[int]:
    """Pids of the local SuperLinks `flwr run` started for this FLWR_HOME (it leaves them running)."""
    return [pid for pid, command in live_commands()
            if "flower-superlink" in command and f"{flwr_home}/local-superlink/" in command]


def test_flwr_run_runs_the_same_apps_and_writes_the_same_outputs(shared_data, tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = (f"num-server-rounds=2 num-clients=2 out-dir='{out}' data-root='{shared_data}' iterations=3 "
                 "restarts=1 seed=2 "
                 # FedAdam wrapped: round 2 shows its float64 cast back
                 "strategy='fedadam' server-lr=0.01 train-mode='steps' batch-size=1 model='lenet'")
    try:
        done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream", "-c", overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        for pid in superlinks_of(home):
            os.kill(pid, signal.SIGTERM)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject, "flwr run rewrote pyproject.toml"

    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["seed"], config["strategy"]) == (2, "fedadam")
    assert [(row["round"], row["model_changed"]) for row in read_jsonl(out / "global.jsonl")] == [(1, True), (2, True)]
    rows = read_jsonl(out / "metrics.jsonl")
    assert sorted((row["round"], row["client"]) for row in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert (out / f"round-{row['round']:03d}/client-{row['client']:03d}/reconstruction.png").is_file()
    assert (out / "gallery.html").is_file()
    deadline = time.monotonic() + 10
    while superlinks_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not superlinks_of(home), "the local SuperLink survived SIGTERM"


class Nodes:
    def __init__(self, count):
        self.count = count

    def get_node_ids(self):
        return list(range(self.count))


class JoiningNodes:
    """SuperNodes that join one by one, as in a deployment: one more every third look."""

    def __init__(self, final):
        self.final, self.looks = final, 0

    def get_node_ids(self):
        self.looks += 1
        return list(range(min(self.final, 1 + self.looks // 3)))


def test_nodes_that_join_one_by_one_are_waited_for():
    wait_for_clients(JoiningNodes(3), 3)
    with pytest.raises(ConfigError, match="has 2 client node.*num-clients is 3"):
        wait_for_clients(JoiningNodes(2), 3, settle=0.5)


def test_a_federation_whose_size_differs_from_num_clients_is_refused():
    wait_for_clients(Nodes(3), 3)
    with pytest.raises(ConfigError, match="has 3 client node.*num-supernodes=2"):
        wait_for_clients(Nodes(3), 2)


def test_the_usage_pages_flwr_run_block_runs_as_written_from_a_fresh_shell(tmp_path):
    """docs/usage.md's `flwr run` block, verbatim, in bash with a bare environment (no venv on PATH), from the
    project folder; then its SuperLink is stopped as the page says, and what it wrote is removed."""
    usage = (ROOT / "docs" / "usage.md").read_text()
    block = usage.split("## Running with `flwr run`")[1].split("```bash")[1].split("```")[0]
    home, out = ROOT / "out" / "flwr-home", ROOT / "out" / "flwr-run"
    assert not out.exists(), f"{out} is in the way of docs/usage.md's command"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           **{key: os.environ[key] for key in ("FL_SIM_DATA",) if key in os.environ}}
    try:
        done = subprocess.run(["bash", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # pyproject's defaults: 2 clients, 3 rounds, imprint on shards the attack reads; digits come back exactly
        assert [row["round"] for row in read_jsonl(out / "global.jsonl")] == [1, 2, 3]
        assert json.loads((out / "run.json").read_text())["config"]["attack"] == "imprint"
        rows = read_jsonl(out / "metrics.jsonl")
        assert len(rows) == 6 and all(row["status"] == "ok" for row in rows)
        assert sum(value >= 30 for row in rows for value in row["psnr_images"]) >= 6, rows
        assert (out / "round-003" / "client-001" / "reconstruction.png").is_file() and (out / "gallery.html").is_file()
    finally:
        for pid in superlinks_of(home):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_trap_weights_on_every_client_are_named_as_why_the_model_never_changed():
    from fl_sim.commands import run as run_module

    starved = {"rounds": 2, "rounds_aggregated": 0, "attacked": 4, "failed": 0, "skipped": 0}
    assert "name the targets with --attack-clients" in run_module.failure(starved, "trap")
    assert "--attack-clients" not in run_module.failure(starved, "idlg")
    assert "--attack-clients" not in run_module.failure(starved, "trap", (0,))
    assert run_module.trap_starves("trap", None) and not run_module.trap_starves("trap", (0, 1))


def test_a_tv_weight_of_zero_is_kept_and_blank_means_the_presets():
    assert RunConfig.from_flower({"tv-weight": 0.0}).tv_weight == 0.0
    assert RunConfig.from_flower({"tv-weight": "0.2"}).tv_weight == 0.2
    assert RunConfig.from_flower({"tv-weight": ""}).tv_weight is None
    assert RunConfig.from_flower({"restarts": 0}).restarts is None  # a count's 0 still means the preset's
