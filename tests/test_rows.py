"""The typed rows of metrics.jsonl and global.jsonl read run folders written before the rows had types, and write
the same keys and values: tests/data/run-before holds two such folders (2 rounds of `fl-sim run`, 3 clients, one
sending NaN: idlg on LeNet under inspect:flag, and idlg on the CNN under DP-SGD, where every attack diverged) with
the gallery, plot and figures the code of that time made of them."""
import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
from PIL import Image

from fl_sim.commands import report
from fl_sim.commands import run as run_module
from fl_sim.results.gallery import PAGE, ROUNDS_PLOT, _settings, write_gallery
from fl_sim.results.outputs import read_jsonl
from fl_sim.results.rows import (
    RECOVERED_DB,
    SCORES,
    GlobalRow,
    MetricsRow,
    global_row,
    metrics_row,
    read_global,
    read_metrics,
    recovered_key,
)
from fl_sim.results.summary import summarise, update_counts

BEFORE = Path(__file__).parent / "data" / "run-before"
RUNS = sorted(path.name for path in BEFORE.iterdir())
EXPECTED = ("expected-figures.json", "expected-gallery.html", "expected-leakage-by-round.png")


@pytest.fixture(params=RUNS)
def run_folder(request, tmp_path) -> Path:
    """A copy of a folder as the run wrote it (its gallery and plot left out, to be made again)."""
    out = tmp_path / request.param
    shutil.copytree(BEFORE / request.param, out, ignore=shutil.ignore_patterns(*EXPECTED))
    return out


def test_the_fixture_is_there():
    assert RUNS == ["cnn-dpsgd-diverged", "idlg-inspect-flag"], f"tests/data/run-before is incomplete: {RUNS}"


@pytest.mark.parametrize("name", RUNS)
def test_rows_written_before_read_into_the_types_and_write_back_the_same_keys_and_values(name):
    for path, row_type in ((BEFORE / name / "metrics.jsonl", MetricsRow), (BEFORE / name / "global.jsonl", GlobalRow)):
        lines = read_jsonl(path)
        typed = [row_type.from_json(line) for line in lines]
        assert all(not row.extra for row in typed), "every key of today's rows is a field of its type"
        assert [list(row.to_json().items()) for row in typed] == [list(line.items()) for line in lines], path


def test_the_report_and_the_summaries_of_an_old_folder_are_what_they_were(run_folder):
    expected = json.loads((BEFORE / run_folder.name / "expected-figures.json").read_text())
    rows = read_metrics(run_folder / "metrics.jsonl")
    assert json.loads(json.dumps(summarise(rows))) == expected["summarise"]
    assert update_counts(rows) == expected["update_counts"]
    assert json.loads(json.dumps(run_module.summary(run_folder, 0.0))) == expected["run_summary"]

    assert report.main(type("Args", (), {"out": str(run_folder)})) == 0
    assert (run_folder / PAGE).read_bytes() == (BEFORE / run_folder.name / "expected-gallery.html").read_bytes()
    # the rounds plot is redrawn from the same rows; its drawing has changed since (one scatter for every round's
    # clients, consecutive rounds pooled beyond 60 boxes), so its bytes are not held, only its size in pixels
    with Image.open(run_folder / ROUNDS_PLOT) as now, \
            Image.open(BEFORE / run_folder.name / "expected-leakage-by-round.png") as before:
        assert now.size == before.size


def test_a_missing_key_reads_as_none_and_an_unknown_one_is_kept_apart_and_not_written():
    row = MetricsRow.from_json({"round": 1, "client": 0, "status": "ok", "psnr": 31.0, "from_a_newer_version": 7})
    assert (row.round, row.status, row.ssim, row.true_labels) == (1, "ok", None, None)
    assert row.extra == {"from_a_newer_version": 7} and "from_a_newer_version" not in row.to_json()
    assert GlobalRow.from_json({"round": 2}).accuracy is None


def test_each_kind_of_row_writes_the_keys_it_always_had():
    left_out = metrics_row("rejected", round=1, client=2, reason="not finite")
    assert left_out.to_json() == {"round": 1, "client": 2, "status": "rejected", "reason": "not finite",
                                  "psnr": None, "ssim": None, "mse": None, "label_acc": None}
    analytic = metrics_row("ok", round=1, client=0, psnr=50.0, true_labels=[3], loss=None)
    assert "loss" in analytic.to_json() and "reason" not in analytic.to_json()
    assert global_row(1, 0.5, 2.0, 3.0, True).to_json() == {"round": 1, "accuracy": 0.5, "loss": 2.0,
                                                           "elapsed_seconds": 3.0, "model_changed": True}
    with pytest.raises(TypeError, match="no field psnr_median"):
        metrics_row("ok", psnr_median=1.0)


def test_the_row_declares_a_share_for_every_recovery_threshold_and_every_score():
    names = {entry.name for entry in fields(MetricsRow)}
    assert {recovered_key(db) for db in RECOVERED_DB} | set(SCORES) <= names


def test_the_header_reads_the_run_config_as_a_run_config():
    """An older run.json may hold a key this version dropped: it is left out, the rest still shown."""
    shown = _settings({"config": {"attack": "idlg", "iterations": 30, "train-mode": "fedsgd", "batch-size": 1,
                                  "a-dropped-setting": 3}})
    assert "idlg (passive: iterations 30)" in shown and "fedsgd: one step of 1 examples" in shown
    assert _settings({"config": {"batch-size": "many"}}) == ""  # not a run config: no header rather than an error


def test_a_gallery_is_written_for_a_folder_with_rows_of_unknown_keys(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "client": 0, "status": "rejected",
                                                        "reason": "x", "new-key": 1}) + "\n")
    (tmp_path / "global.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "loss": 1.0}) + "\n")
    text = write_gallery(tmp_path).read_text()
    assert "1 left out" in text and "global accuracy 50.00%" in text
    assert [row.status for row in read_metrics(tmp_path / "metrics.jsonl")] == ["rejected"]
    assert [row.accuracy for row in read_global(tmp_path / "global.jsonl")] == [0.5]
