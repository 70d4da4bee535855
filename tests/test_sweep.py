"""`fl-sim sweep`: a real grid on MNIST gives results.csv and plots, resumes, and refuses bad grids up front."""
import csv
import json

import pytest

from fl_sim.commands.cli import main
from fl_sim.commands.sweep import point_name


def _sweep(data, out, grid, *extra):
    return main(["sweep", "--grid", grid, "--dataset", "mnist", "--data-root", str(data), "--model", "lenet",
                 "--attack", "ig", "--iterations", "100", "--num-victims", "2", "--device", "cpu", "--seed", "0",
                 "--out", str(out), *extra])


def test_tiny_sweep_writes_results_and_plot_and_resumes(shared_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _sweep(shared_data, out, "batch-size=1,2") == 0
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["batch-size"] for row in rows] == ["1", "2"]
    for row in rows:
        assert float(row["psnr_min"]) <= float(row["psnr_median"]) <= float(row["psnr_max"])
        assert 0 <= float(row["label_acc"]) <= 1 and float(row["seconds"]) > 0
        assert float(row["update_norm_median"]) > 0 and int(row["parameters"]) > 10_000
    assert (out / "batch-size.png").read_bytes()[:4] == b"\x89PNG"
    summaries = {name: (out / "points" / name / "summary.json") for name in ("batch-size=1", "batch-size=2")}
    assert json.loads(summaries["batch-size=2"].read_text())["batch_size"] == 2
    assert (out / "points" / "batch-size=2" / "victim-001" / "reconstruction.png").exists()
    stamps = {name: path.stat().st_mtime_ns for name, path in summaries.items()}
    capsys.readouterr()

    assert _sweep(shared_data, out, "batch-size=1,2") == 0  # everything done: nothing runs again
    assert capsys.readouterr().out.count("done before with the same config, skipped") == 2
    assert {name: path.stat().st_mtime_ns for name, path in summaries.items()} == stamps
    index = (out / "index.html").read_text()
    assert "batch-size.png" in index and "points/batch-size=2/" in index


@pytest.mark.parametrize("grid,message", [
    ("batch-size", "is not KEY=v1,v2"),
    ("colour=red", "'colour' is not a flag a sweep can vary"),
    ("batch-size=1,two", "'two' is not a valid int"),
    ("no-replay=maybe", "neither true nor false"),
    ("rounds=1,2", "means nothing to fl-sim attack"),
    ("out=a,b", "not a flag a sweep can vary"),
    ("batch-size=1 batch-size=2", "given twice"),
    ("model=lenet,vgg", "unknown model 'vgg'"),
    ("local-steps=1,0", "local-steps must be at least 1"),
    ("partition=iid,ring", "'ring' is not one of"),
    ("defense=none,noise:abc", "noise needs SIGMA, a positive number, got 'abc'"),
])
def test_bad_grids_fail_before_any_work(shared_data, tmp_path, capsys, grid, message):
    extra = ["--mode", "run"] if grid.startswith("partition") else []
    assert _sweep(shared_data, tmp_path / "out", grid, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_point_folders_are_safe_names():
    assert point_name({"init": "out/ckpt/a b.pt", "no_replay": True}) == "init=out_ckpt_a_b.pt,no-replay=true"


def _tiny_sweep(folder, out, *extra):
    return main(["sweep", "--grid", "batch-size=1", "--dataset", "imagefolder", "--data-root", str(folder),
                 "--model", "lenet", "--init", "paper", "--attack", "idlg", "--iterations", "1", "--restarts", "1",
                 "--num-victims", "1", "--device", "cpu", "--seed", "0", "--out", str(out), *extra])


def test_a_finished_point_is_reused_only_with_the_same_flags(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    point = out / "points" / "batch-size=1"
    assert _tiny_sweep(tiny_image_folder, out, "--lr", "0.1") == 0
    assert json.loads((point / "point.json").read_text())["flags"]["lr"] == 0.1
    summary = (point / "summary.json").read_bytes()
    capsys.readouterr()

    assert _tiny_sweep(tiny_image_folder, out, "--lr", "0.05") == 2  # a flag the grid does not sweep changed
    error = capsys.readouterr().err
    assert "point 'batch-size=1' was run with --lr 0.1 (this sweep: 0.05)" in error and "--force" in error
    assert (point / "summary.json").read_bytes() == summary

    assert _tiny_sweep(tiny_image_folder, out, "--lr", "0.05", "--force") == 0
    assert "running again (--force)" in capsys.readouterr().out
    assert json.loads((point / "point.json").read_text())["flags"]["lr"] == 0.05
    assert json.loads((point / "summary.json").read_text())["lr"] == 0.05

    assert _tiny_sweep(tiny_image_folder, out, "--lr", "0.05", "--data-root", str(tiny_image_folder)) == 0
    assert "done before with the same config, skipped" in capsys.readouterr().out


def test_a_point_without_a_recorded_config_is_not_trusted(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _tiny_sweep(tiny_image_folder, out) == 0
    (out / "points" / "batch-size=1" / "point.json").unlink()  # as a sweep of an older fl-sim left it
    assert _tiny_sweep(tiny_image_folder, out) == 2
    assert "without a record of its config" in capsys.readouterr().err


def test_a_flag_added_since_a_point_ran_counts_as_unchanged_only_at_its_default(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _tiny_sweep(tiny_image_folder, out) == 0
    record = out / "points" / "batch-size=1" / "point.json"
    stored = json.loads(record.read_text())
    del stored["flags"]["tv-weight"], stored["flags"]["bn-statistics"]  # as an fl-sim without these flags wrote it
    record.write_text(json.dumps(stored))
    capsys.readouterr()
    assert _tiny_sweep(tiny_image_folder, out) == 0
    assert "done before with the same config, skipped" in capsys.readouterr().out
    record.write_text(json.dumps(stored))
    assert _tiny_sweep(tiny_image_folder, out, "--tv-weight", "0.2") == 2
    assert "--tv-weight (unset) (this sweep: 0.2)" in capsys.readouterr().err
