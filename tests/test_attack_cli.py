"""The `fl-sim attack` contract: flags, files and keys other tools rely on; same seed, same result."""
import json

import pytest

from fl_sim.cli import main

SUMMARY_KEYS = {"psnr_median", "psnr_mean", "psnr_min", "ssim_mean", "label_acc", "victims", "iterations",
                "attack_seconds", "seconds"}


def _attack(folder, out, *extra):
    return main(["attack", "--dataset", "imagefolder", "--data-root", str(folder), "--model", "lenet",
                 "--init", "paper", "--attack", "idlg", "--batch-size", "1", "--num-victims", "3",
                 "--iterations", "2", "--seed", "0", "--out", str(out), *extra])


def test_attack_writes_the_contract_and_is_reproducible(tiny_image_folder, tmp_path):
    assert _attack(tiny_image_folder, tmp_path / "a") == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["victims"] == 3 and summary["iterations"] == 2
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [row["victim"] for row in rows] == [0, 1, 2]
    assert all({"psnr", "ssim", "mse", "label_acc", "status"} <= set(row) for row in rows)
    for victim in range(3):
        for name in ("truth.png", "reconstruction.png"):
            assert (tmp_path / "a" / f"victim-{victim:03d}" / name).stat().st_size > 0
    assert summary["psnr_min"] <= summary["psnr_median"] <= max(row["psnr"] for row in rows)

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
