"""Honest counts: every client-round of a run is counted once, by what became of it, and the kinds add up in the
run's headline, its summary and its gallery; the header names only the settings that shaped the run."""
import logging

from fl_sim.commands import run as run_module
from fl_sim.results.gallery import _settings, write_gallery
from fl_sim.results.outputs import rewrite_jsonl, write_json
from fl_sim.results.rows import MetricsRow
from fl_sim.results.summary import summarise, update_counts

ROWS = [  # one row of every kind, in round 1
    {"round": 1, "client": 0, "status": "ok", "psnr": 60.0, "psnr_images": [100.0, 5.0], "true_labels": [1, 2]},
    {"round": 1, "client": 1, "status": "ok", "psnr": 12.0, "psnr_images": [12.0, 11.0], "true_labels": [3, 4]},
    {"round": 1, "client": 2, "status": "diverged", "psnr": None, "true_labels": [5, 6], "reason": "nan loss"},
    {"round": 1, "client": 3, "status": "skipped", "reason": "300 images behind the update, more than 64"},
    {"round": 1, "client": 4, "status": "rejected", "reason": "not finite"},
    {"round": 1, "client": 5, "status": "client-error", "reason": "injected crash"},
    {"round": 1, "client": 6, "status": "no-reply", "reason": "timed out"},
]


def test_every_kind_of_row_is_counted_once_and_the_kinds_add_up():
    rows = [MetricsRow.from_json(row) for row in ROWS]
    counts = update_counts(rows)
    assert counts == {"updates": 7, "attacked": 3, "recovered": 1, "unrecovered": 1, "failed": 1, "skipped": 1,
                      "left_out": 3}
    assert counts["attacked"] + counts["skipped"] + counts["left_out"] == counts["updates"]
    assert counts["recovered"] + counts["unrecovered"] + counts["failed"] == counts["attacked"]
    for row in rows:  # each kind alone lands in exactly one count
        alone = update_counts([row])
        assert alone["attacked"] + alone["skipped"] + alone["left_out"] == 1, row
        assert alone["recovered"] + alone["unrecovered"] + alone["failed"] == alone["attacked"], row
    summary = summarise(rows)  # a skipped update is no victim: its images are not counted as lost
    assert (summary["victims"], summary["failed"], summary["skipped"], summary["left_out"]) == (3, 1, 1, 3)
    assert summary["images"] == 6 and summary["recovered_at_30db"] == 1 / 6


def test_the_headline_and_the_gallery_say_the_same_counts(tmp_path):
    out = tmp_path / "run"
    write_json(out / "run.json", {"config": {"attack": "idlg", "train-mode": "steps", "local-steps": 4,
                                             "batch-size": 8, "epochs": 1, "iterations": 300}})
    rewrite_jsonl(out / "global.jsonl", [{"round": 1, "accuracy": 0.25, "loss": 2.0}])
    rewrite_jsonl(out / "metrics.jsonl", ROWS)
    result = run_module.summary(out, 1.0)
    line = run_module.counts_line(result)
    assert line == ("7 client update(s): 3 attacked (1 with images recovered at >= 30 dB, 1 without, 1 failed), "
                    "1 skipped (not read by the attack), 3 left out (faulty replies)")
    assert run_module.recovered_line(result) == "images recovered: 17% at >= 30 dB, 17% at >= 40 dB (of 6)"
    assert run_module.failure(result, "idlg") is None
    html = write_gallery(out).read_text()
    assert line.replace(">=", "\u2265") in html


def test_the_header_names_the_settings_that_shaped_the_run():
    imprint = _settings({"config": {"train-mode": "epochs", "epochs": 2, "batch-size": 32, "local-steps": 1,
                                    "attack": "imprint", "iterations": 300, "imprint-bins": 0, "imprint-blocks": 4,
                                    "min-shard": 128, "max-shard": 160, "defense": "none"}})
    assert "epochs: 2 pass(es) over the shard in batches of 32" in imprint and "128 to 160 examples" in imprint
    assert "imprint (active: imprint bins 256, imprint blocks 4)" in imprint
    assert "iterations" not in imprint and "step" not in imprint
    passive = _settings({"config": {"train-mode": "steps", "epochs": 1, "local-steps": 4, "batch-size": 8,
                                    "attack": "idlg", "iterations": 300, "imprint-bins": 0, "max-shard": 0}})
    assert "steps: 4 step(s) of 8 examples" in passive and "idlg (passive: iterations 300)" in passive
    assert "bins" not in passive and "epochs" not in passive and "whole partition" in passive


def test_only_flowers_run_simulation_deprecation_is_hidden(caplog):
    logger = logging.getLogger("flwr")
    logger.addFilter(hide := run_module.HideRunSimulationDeprecation())
    try:
        with caplog.at_level(logging.WARNING, logger="flwr"):
            logger.warning("DEPRECATED FEATURE: %s", "The `run_simulation` function is deprecated and will be removed")
            logger.warning("DEPRECATED FEATURE: %s", "something else")
    finally:
        logger.removeFilter(hide)
    assert [record.getMessage() for record in caplog.records] == ["DEPRECATED FEATURE: something else"]
