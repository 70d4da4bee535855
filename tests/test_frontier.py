"""benchmarks/frontier.py: the frontier's figures, table and plot assembled from small saved files (a
benchmarks/detectors.py scores file, metrics.jsonl rows, a disguised attack's figures), no run."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fl_sim.results.rows import MetricsRow

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"inspect": 0.0, "dsnr": 2.0, "size": 1.01}


@pytest.fixture
def frontier(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/frontier.py` has it
    spec = importlib.util.spec_from_file_location("frontier", ROOT / "benchmarks" / "frontier.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores_file(path: Path, frontier) -> Path:
    """A detectors.py --scores file: 4 honest client-rounds of two models, 4 attacked ones of two cnn rows."""
    path.write_text(json.dumps({"args": {"seed": 0}, "honest": {
        "cnn:cifar10": {"inspect": [0, 0, 0, 0], "dsnr": [0.2, 0.3, 2.5, 0.1], "size": [1, 1, 1, 1]},
        "lenet:mnist": {"inspect": [0, 0, 0, 0], "dsnr": [0.1, 0.1, 0.1, 0.1], "size": [1, 1, 1, 1]}},
        "attacked": {"cnn:cifar10": {
            frontier.PASSIVE_ROW: {"inspect": [0, 0, 0, 0], "dsnr": [0.2, 0.2, 0.2, 0.2], "size": [1, 1, 1, 1]},
            "trap": {"inspect": [3, 0, 0, 0], "dsnr": [0.2, 5.0, math.nan, 0.2], "size": [1, 1, 1, 1]}}}}))
    return path


def test_flag_counts_counts_each_detector_and_the_suite(frontier):
    counts = frontier.flag_counts({"inspect": [3, 0, 0, 0], "dsnr": [0.2, 5.0, math.nan, 0.2],
                                   "size": [1, 1, 1, 1.5]}, LIMITS)
    # a score that is not a number is flagged; the suite flags a client-round any detector flags
    assert counts == {"inspect": [1, 4], "dsnr": [2, 4], "size": [1, 4], "suite": [4, 4]}
    with pytest.raises(frontier.FrontierError, match="differ in length"):
        frontier.flag_counts({"inspect": [0, 0], "dsnr": [0.1]}, LIMITS)


def test_a_failed_victim_counts_its_images_unrecovered(frontier):
    rows = [MetricsRow.from_json({"round": 1, "client": 0, "status": "ok", "psnr": 30.0,
                                  "psnr_images": [40.0, 25.0, 10.0, 35.0], "true_labels": [0, 1, 2, 3]}),
            MetricsRow.from_json({"round": 1, "client": 1, "status": "attack-error", "psnr": None,
                                  "true_labels": [4, 5, 6, 7]}),
            MetricsRow.from_json({"round": 1, "client": 2, "status": "rejected"})]  # left out: not a victim
    values = frontier.image_values(rows)
    assert sorted(values.tolist()) == [0, 0, 0, 0, 10, 25, 35, 40]
    assert frontier.leakage(values) == {"images": 8, "share_20db": 3 / 8, "share_30db": 2 / 8, "psnr_median": 5.0}


def test_the_table_and_plot_from_saved_files(frontier, tmp_path, capsys, monkeypatch):
    honest, attacked = frontier.read_scores([str(scores_file(tmp_path / "a.json", frontier)),
                                             str(scores_file(tmp_path / "b.json", frontier))])
    assert len(honest["cnn:cifar10"]["dsnr"]) == 8  # two files' client-rounds end to end
    runs = {"ig": {0: np.array([12.0, 14.0]), 1: np.array([25.0, 8.0])},
            "trap": {0: np.array([100.0, 0.0, 35.0, 31.0]), 1: np.array([0.0, 0.0, 0.0, 50.0])}}
    figures = frontier.assemble(runs, {"ig": "passive", "trap": "active"}, attacked, honest, LIMITS, {})
    ig, trap = figures["attacks"]
    assert ig["detection_row"] == frontier.PASSIVE_ROW and ig["flagged"]["suite"] == 0.0
    assert ig["share_20db"] == 0.25 and ig["share_30db"] == 0.0
    assert trap["share_30db"] == 0.5 and trap["worst_30db"] == 0.25 and trap["images"] == 8
    assert trap["flagged_of"]["dsnr"] == [4, 8] and trap["flagged"]["suite"] == 0.75
    assert figures["false_positives"]["cnn:cifar10"]["dsnr"] == [2, 8]
    saved = tmp_path / "frontier.json"
    saved.write_text(json.dumps(figures))
    (tmp_path / "disguise.json").write_text(json.dumps({
        "attack": "disguised", "model": "resnet20", "psnr_median": 21.5, "share_20db": 0.6, "share_30db": 0.1,
        "flagged": {"inspect": 0.0, "dsnr": 0.005, "size": 0.0}}))
    png = tmp_path / "frontier.png"
    monkeypatch.setattr("sys.argv", ["frontier.py", "--plot", str(saved), "--png", str(png),
                                     "--disguise", str(tmp_path / "disguise.json")])
    frontier.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| attack | kind | images | >= 20 dB | >= 30 dB | PSNR median | inspect | dsnr | size | suite |"
    assert lines[2] == "| ig (cnn) | passive | 4 | 25% | 0% | 13.0 dB | 0% | 0% | 0% | 0% |"
    assert lines[3] == "| trap (cnn) | active | 8 | 50% | 50% | 15.5 dB | 25% (2/8) | 50% (4/8) | 0% | 75% (6/8) |"
    assert lines[4] == "| disguised (resnet20) | disguised | n/m | 60% | 10% | 21.5 dB | 0% | 0.5% | 0% | n/m |"
    assert "| cnn:cifar10 | 8 | 0 (0.0%) | 2 (25.0%) | 0 (0.0%) | 2 (25.0%) |" in lines
    assert png.stat().st_size > 10_000
    drawn = frontier.plot(frontier.add_disguise(figures, tmp_path / "disguise.json"), str(png))
    assert len(drawn) == 4 + 4 + 3  # a point per attack and detector it was measured under
    assert ("trap", "suite", 0.75, 0.5) in drawn and ("disguised", "dsnr", 0.005, 0.1) in drawn


def test_bad_files_end_in_one_line(frontier, tmp_path, capsys, monkeypatch):
    (tmp_path / "broken.json").write_text("{")
    for argv in (["--plot", str(tmp_path / "missing.json")], ["--scores", str(tmp_path / "broken.json")], []):
        monkeypatch.setattr("sys.argv", ["frontier.py", *argv, "--disguise", str(tmp_path / "none.json")])
        with pytest.raises(SystemExit) as stopped:
            frontier.main()
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("frontier: ") and error.count("\n") == 1


def test_plot_files_merge_a_later_files_attacks_over_an_earliers(frontier, tmp_path, monkeypatch, capsys):
    def figures(*attacks: tuple[str, float]) -> dict:
        return {"detectors": ["dsnr"], "false_positives": {"cnn:cifar10": {"dsnr": [0, 600]}}, "attacks": [
            {"attack": name, "kind": "active", "model": "cnn", "images": 16, "share_20db": share,
             "share_30db": share, "psnr_median": 50.0, "flagged": {"dsnr": 0.0}} for name, share in attacks]}

    (tmp_path / "a.json").write_text(json.dumps(figures(("trap", 0.5), ("qbi", 0.25))))
    (tmp_path / "b.json").write_text(json.dumps(figures(("qbi", 0.75), ("mosaic", 1.0))))
    merged = tmp_path / "merged.json"
    monkeypatch.setattr("sys.argv", ["frontier.py", "--plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                     "--json", str(merged), "--disguise", str(tmp_path / "none.json")])
    frontier.main()
    written = json.loads(merged.read_text())
    assert [(e["attack"], e["share_30db"]) for e in written["attacks"]] == [("trap", 0.5), ("qbi", 0.75),
                                                                          ("mosaic", 1.0)]
    assert "| qbi (cnn) | active | 16 | 75% | 75% | 50.0 dB | 0% |" in capsys.readouterr().out


def test_the_disguised_attacks_own_file_gives_the_round_it_is_sent_in(frontier, tmp_path):
    """benchmarks/disguise.py's file (each detector's flagged share of the round the model is sent in, and the
    simulated rounds' reads) becomes one frontier entry: its shares, counts, images, and the suite at 0 when no
    detector flagged anything; a detector that flagged some leaves the suite unmeasured."""
    sent = {"inspect": {"flagged_share": 0.0, "client_rounds": 30}, "dsnr": {"flagged_share": 0.0, "client_rounds": 30}}
    written = {"attack": "disguise", "model": "cnn", "psnr_median": 19.2, "share_20db": 0.4, "share_30db": 0.0,
               "simulation": {"rounds": 90}, "detectors_first_round": sent}
    (tmp_path / "disguise.json").write_text(json.dumps(written))
    entry = frontier.add_disguise({"attacks": []}, tmp_path / "disguise.json")["attacks"][-1]
    assert entry["images"] == 90 and entry["flagged"] == {"inspect": 0.0, "dsnr": 0.0, "suite": 0.0}
    assert entry["flagged_of"]["suite"] == [0, 30]
    sent["dsnr"]["flagged_share"] = 0.1
    (tmp_path / "disguise.json").write_text(json.dumps(written))
    entry = frontier.add_disguise({"attacks": []}, tmp_path / "disguise.json")["attacks"][-1]
    assert "suite" not in entry["flagged"] and entry["flagged_of"]["dsnr"] == [3, 30]
