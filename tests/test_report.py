"""`fl-sim report`: pages rebuilt from files alone, with every value escaped."""
import csv
import json

from fl_sim.commands.cli import main
from fl_sim.results import plots


def test_sweep_page_is_rebuilt_from_the_points_and_escaped(tmp_path):
    out = tmp_path / "sweep"
    points = [{"folder": "model=lenet", "settings": {"model": "lenet"}},
              {"folder": "model=x", "settings": {"model": "<script>alert(1)</script>"}},
              {"folder": "model=cnn", "settings": {"model": "cnn"}}]  # unfinished: no summary
    (out / "points" / "model=lenet").mkdir(parents=True)
    (out / "points" / "model=x").mkdir()
    (out / "sweep.json").write_text(json.dumps(
        {"mode": "attack", "grid": {"model": ["lenet", "<script>alert(1)</script>", "cnn"]}, "points": points}))
    (out / "points" / "model=lenet" / "summary.json").write_text(json.dumps(
        {"psnr_median": 40.0, "psnr_min": 30.0, "psnr_max": 50.0, "ssim_mean": 0.9, "label_acc": 1.0,
         "seconds": 2.0, "batch_size": 1, "attack": "idlg"}))
    (out / "points" / "model=x" / "summary.json").write_text(json.dumps(
        {"psnr_median": 12.5, "ssim_mean": 0.1, "label_acc": 0.5, "seconds": 1.0}))

    assert main(["report", str(out)]) == 0
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    expected = [("lenet", "40"), ("<script>alert(1)</script>", "12.5")]
    assert [(row["model"], row["psnr_median"]) for row in rows] == expected
    assert "batch_size" not in rows[0] and "attack" not in rows[0]  # echoes of settings and text are not figures
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "2 of 3 point(s) finished" in page and "<img src='model.png'" in page
    assert (out / "model.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "leakage-vs-accuracy.png").exists()  # an attack sweep has no global model to score


def test_a_run_sweep_plots_leakage_against_accuracy(tmp_path):
    out = tmp_path / "sweep"
    points = [{"folder": f"defense={name}", "settings": {"defense": name}} for name in ("none", "prune:0.9")]
    (out / "sweep.json").parent.mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"mode": "run", "grid": {"defense": ["none", "prune:0.9"]},
                                                "points": points}))
    for point, (psnr, accuracy) in zip(points, [(70.0, 0.4), (4.0, 0.3)]):
        (out / "points" / point["folder"]).mkdir(parents=True)
        (out / "points" / point["folder"] / "summary.json").write_text(json.dumps(
            {"psnr_median": psnr, "psnr_min": psnr - 1, "psnr_max": psnr + 1, "label_acc": 1.0,
             "accuracy": accuracy}))
    assert main(["report", str(out)]) == 0
    with open(out / "results.csv") as file:
        assert [(row["defense"], row["accuracy"]) for row in csv.DictReader(file)] == [("none", "0.4"),
                                                                                      ("prune:0.9", "0.3")]
    assert (out / "leakage-vs-accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "<img src='leakage-vs-accuracy.png'" in (out / "index.html").read_text()


def test_run_page_is_the_gallery(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {"model": "lenet"}}))
    (out / "global.jsonl").write_text(json.dumps({"round": 1, "accuracy": 0.5, "loss": 1.0}) + "\n")
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1, "client": 0, "psnr": 33.0, "status": "ok"}) + "\n")
    assert main(["report", str(out)]) == 0
    assert "Round 1: global accuracy 50.00%" in (out / "gallery.html").read_text()


def test_a_folder_of_neither_kind_is_one_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a sweep" in capsys.readouterr().err


def test_an_attack_sweep_reports_seconds_per_victim_and_marks_passive_and_active(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    grid = {"attack": ["ig", "imprint"], "batch_size": ["8", "32"]}
    points = [{"folder": f"attack={a},batch-size={b}", "settings": {"attack": a, "batch_size": b}}
              for a in grid["attack"] for b in grid["batch_size"]]
    (out / "points").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"mode": "attack", "grid": grid, "points": points}))
    for index, point in enumerate(points):
        (out / "points" / point["folder"]).mkdir()
        summary = {"psnr_median": 20.0, "recovered_at_30db": 0.5, "recovered_at_40db": 0.25, "victims": 4,
                   "attack_seconds": 8.0, "attack_seconds_per_victim": 3.0 if index == 0 else 2.0}
        (out / "points" / point["folder"] / "summary.json").write_text(json.dumps(summary))
    legends = []
    real_plot = plots.plt.Axes.plot

    def spy(axis, *args, label=None, **kwargs):
        legends.append(label)
        return real_plot(axis, *args, label=label, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "plot", spy)
    assert main(["report", str(out)]) == 0
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["attack_seconds_per_victim"] for row in rows] == ["3", "2", "2", "2"]
    assert "recovered_at_40db" in rows[0]
    assert {"ig (passive)", "imprint (active)"} <= set(legends)
