"""`fl-sim pretrain`: a short central training on real MNIST learns, and its checkpoint works as --init."""
import json

import torch

from fl_sim.commands.cli import main
from fl_sim.learning.models import build_model


def test_pretrained_checkpoint_learns_and_loads_as_init(shared_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt" / "cnn.pt"
    assert main(["pretrain", "--dataset", "mnist", "--data-root", str(shared_data), "--model", "cnn",
                 "--epochs", "1", "--train-examples", "2000", "--device", "cpu", "--out", str(ckpt)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    record = json.loads((tmp_path / "ckpt" / "cnn.pt.json").read_text())
    assert record["test_accuracy"] > 0.6 and record["train_examples"] == 2000  # chance is 0.1
    trained = build_model("cnn", 1, 28, 10, init=str(ckpt))
    fresh = build_model("cnn", 1, 28, 10)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))


def test_bad_flags_are_refused_before_training(tmp_path, capsys):
    assert main(["pretrain", "--epochs", "0", "--out", str(tmp_path / "c.pt")]) == 2
    assert "--epochs must be positive" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()
