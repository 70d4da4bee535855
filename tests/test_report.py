"""`fl-sim report`: pages rebuilt from files alone, with every value escaped."""
import csv
import json

from fl_sim.cli import main


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
    assert [(row["model"], row["psnr_median"]) for row in rows] == [("lenet", "40"), ("<script>alert(1)</script>", "12.5")]
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
