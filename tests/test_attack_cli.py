"""The `fl-sim attack` contract: flags, files and keys other tools rely on; same seed, same result."""
import json

import numpy as np
import pytest
import torch

from attacker import Reconstruction
from fl_sim.commands.cli import build_parser, main
from fl_sim.server import passive as passive_module

SUMMARY_KEYS = {"psnr_median", "psnr_mean", "psnr_min", "ssim_mean", "label_acc", "victims", "iterations",
                "attack_seconds", "seconds"}


def _attack(folder, out, *extra):
    return main(["attack", "--dataset", "imagefolder", "--data-root", str(folder), "--model", "lenet",
                 "--init", "paper", "--attack", "idlg", "--batch-size", "1", "--num-victims", "3",
                 "--iterations", "2", "--seed", "0", "--out", str(out), *extra])


def test_attack_writes_the_contract_and_is_reproducible(tiny_image_folder, tmp_path):
    assert _attack(tiny_image_folder, tmp_path / "a") == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS and summary["victims"] == 3 and summary["iterations"] == 2
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["victim"] for row in rows] == [0, 1, 2]
    assert all({"psnr", "ssim", "mse", "label_acc", "status"} <= set(row) for row in rows)
    for victim in range(3):
        for name in ("truth.png", "reconstruction.png"):
            assert (tmp_path / "a" / f"victim-{victim:03d}" / name).stat().st_size > 0
    psnrs = [row["psnr"] for row in rows]  # every victim succeeded here
    assert summary["failed"] == 0 and all(row["status"] == "ok" for row in rows)
    assert summary["psnr_median"] == pytest.approx(float(np.median(psnrs)))
    assert summary["psnr_min"] == pytest.approx(min(psnrs)) and summary["psnr_max"] == pytest.approx(max(psnrs))
    pooled = sum(row["recovered_at_30db"] * len(row["psnr_images"]) for row in rows) / 3
    assert summary["recovered_at_30db"] == pytest.approx(pooled)
    assert all(len(row["psnr_images"]) == 1 and row["recovered_at_30db"] == float(row["psnr_images"][0] >= 30)
               for row in rows)

    assert _attack(tiny_image_folder, tmp_path / "b") == 0
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [row["psnr"] for row in again] == [row["psnr"] for row in rows]


def test_secagg_attacks_the_victims_mean_update_as_one_batch(tiny_image_folder, tmp_path):
    assert _attack(tiny_image_folder, tmp_path / "a", "--defense", "secagg") == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["victims"] == 1 and summary["defense"] == "secagg"
    [row] = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(row["true_labels"]) == len(row["psnr_images"]) == 3  # the three victims' images, in one batch


def test_frozen_batchnorm_is_what_the_clients_train_with_and_the_attack_replays(tiny_image_folder, tmp_path):
    assert _attack(tiny_image_folder, tmp_path / "a", "--model", "resnet20", "--init", "default",
                   "--batchnorm", "frozen") == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["batchnorm"] == "frozen" and summary["failed"] == 0 and summary["victims"] == 3


def test_the_batchnorm_statistics_term_is_weighed_in_when_asked(tiny_image_folder, tmp_path):
    losses = {}
    for weight in ("0", "100"):
        out = tmp_path / weight
        assert _attack(tiny_image_folder, out, "--model", "resnet20", "--init", "default", "--attack", "ig",
                       "--num-victims", "1", "--bn-statistics", weight) == 0
        assert json.loads((out / "summary.json").read_text())["bn_statistics"] == float(weight)
        [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[weight] = row["loss"]
    assert losses["100"] != losses["0"]  # the same images and draws: only the statistics term differs


def test_the_tv_weight_overrides_the_preset_and_zero_means_none(tiny_image_folder, tmp_path):
    summaries, losses = {}, {}
    for weight in (None, "0", "0.2"):
        out = tmp_path / str(weight)
        assert _attack(tiny_image_folder, out, "--attack", "ig", "--num-victims", "1",
                       *(["--tv-weight", weight] if weight else [])) == 0
        summaries[weight] = json.loads((out / "summary.json").read_text())["tv_weight"]
        [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[weight] = row["loss"]
    assert summaries == {None: 0.01, "0": 0.0, "0.2": 0.2}
    assert len(set(losses.values())) == 3  # the same images and draws: only the prior's weight differs


def test_an_unknown_batchnorm_mode_is_refused(tiny_image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _attack(tiny_image_folder, tmp_path / "out", "--batchnorm", "eval")
    assert exit_.value.code == 2 and "invalid choice: 'eval'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--model", "vgg"], "unknown model"),
    (["--attack", "magic"], "unknown attack"),
    (["--lr", "0"], "lr must be positive"),
    (["--local-steps", "0"], "local-steps must be at least 1"),
    (["--bn-statistics", "-1"], "bn-statistics must be at least 0"),
    (["--tv-weight", "-0.5"], "tv-weight must be at least 0"),
    (["--num-victims", "100"], "need 100 examples"),
    (["--init", "missing.pt"], "neither 'default', 'paper' nor"),
    (["--defense", "noise:abc"], "noise needs SIGMA, a positive number, got 'abc'"),
])
def test_bad_input_gets_one_clear_sentence(tiny_image_folder, tmp_path, capsys, flags, message):
    assert _attack(tiny_image_folder, tmp_path / "out", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_missing_data_says_what_to_do(tmp_path, capsys):
    code = main(["attack", "--dataset", "mnist", "--data-root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert code == 2 and "--data-root" in capsys.readouterr().err


def test_a_non_empty_out_is_refused_and_force_clears_it(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _attack(tiny_image_folder, out, "--num-victims", "5") == 0
    assert (out / "victim-004").is_dir()
    summary = (out / "summary.json").read_bytes()

    assert _attack(tiny_image_folder, out) == 2  # 3 victims into the folder of 5
    assert "is not empty" in capsys.readouterr().err and (out / "summary.json").read_bytes() == summary

    assert _attack(tiny_image_folder, out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "summary.json", "victim-000", "victim-001",
                                                     "victim-002"]  # victim-003 and -004 of the larger run: gone
    assert json.loads((out / "summary.json").read_text())["victims"] == 3


def test_force_deletes_only_what_fl_sim_attack_wrote(tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("not fl-sim's")
    assert _attack(tiny_image_folder, out, "--force") == 2
    assert "thesis.tex, which fl-sim attack did not write" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "not fl-sim's"


def test_when_every_victim_fails_the_exit_status_is_3(tiny_image_folder, tmp_path, capsys, monkeypatch):
    def failing_engine(model, global_weights, updates, *args, **kwargs):
        return [Reconstruction(torch.empty(0), torch.empty(0, dtype=torch.long), float("inf"), "diverged")
                for _ in updates]

    monkeypatch.setattr(passive_module, "invert", failing_engine)
    assert _attack(tiny_image_folder, tmp_path / "out") == 3
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "failed for every victim" in last_line and "exit status 3" in last_line
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == summary["victims"] == 3
    assert summary["psnr_median"] == 0.0 and summary["recovered_at_30db"] == 0.0 and summary["label_share"] == 0.0


def test_the_exit_status_is_documented_in_help():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    assert "3 when the attack failed for every victim" in commands.choices["attack"].format_help()
