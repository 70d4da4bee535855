"""The malicious server's analytic attacks on real images: exact recovery, mixtures and placeholders marked."""
import numpy as np
import pytest
import torch
from flower_helpers import LocalGrid

from attacker.analytic import CONFIRMED, UNRECOVERED, recover
from clients.training import local_train
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights
from fl_sim.results import metrics
from fl_sim.results.evaluation import score_and_save
from fl_sim.server.active import ImprintAttack, TrapAttack, public_images
from fl_sim.server.attacks import Observed, Victim


def one_round(shared_data, dataset, model_name, attack, settings, blocks=4, seed=0):
    train, test = load_dataset(dataset, shared_data, True), load_dataset(dataset, shared_data, False)
    shape = (train.channels, train.image_size, train.image_size)
    rows = 256 if attack == "imprint" else 0
    model = build_model(model_name, shape[0], shape[1], 10, seed=seed, imprint=rows)
    public = public_images(test, count=1024)
    server = ImprintAttack(model, public, 10, blocks) if attack == "imprint" else TrapAttack(model, public, 10, seed)
    armed = server.arm(weights(model), settings, [0])  # through the Attack interface: send, train, read
    sent = armed.weights[0]
    images, labels = train.tensors(np.random.default_rng(seed).choice(len(train), settings.num_images, replace=False))
    client = build_model(model_name, shape[0], shape[1], 10, imprint=rows)
    client.load_state_dict(sent)
    local_train(client, images, labels, settings)
    update = weight_change(sent, weights(client))
    [result] = server.read([Observed(Victim((0,)), update, sent, settings)], armed, seed=0)
    return result, images, labels


def test_imprint_recovers_most_of_a_batch_exactly_and_confirms_only_true_images(shared_data):
    settings = TrainingSettings(lr=0.1, batch_size=32)
    result, images, labels = one_round(shared_data, "cifar10", "lenet", "imprint", settings)
    score = metrics.score(result.images, result.labels, images, labels)
    psnr = np.array(score["psnr_images"])
    status = np.array(result.image_status)[score["order"]]
    assert (psnr >= 40).mean() >= 0.75
    # confirmed images are nearly all exact (a few fall under 40 dB: peeling carries rounding on)
    assert (psnr[status == CONFIRMED] >= 40).mean() >= 0.9


def test_one_imprint_block_leaves_mixtures_unconfirmed(shared_data):
    result, images, labels = one_round(shared_data, "cifar10", "lenet", "imprint",
                                       TrainingSettings(lr=0.1, batch_size=64), blocks=1)
    assert CONFIRMED not in result.image_status  # nothing can vouch for a bin's content with one block
    score = metrics.score(result.images, result.labels, images, labels)
    assert 0.3 < np.mean(np.array(score["psnr_images"]) >= 40) < 1  # lone images exact, shared bins not


def test_trap_weights_recover_mnist_through_the_mlp(shared_data):
    result, images, labels = one_round(shared_data, "mnist", "mlp", "trap", TrainingSettings(lr=0.1, batch_size=16))
    score = metrics.score(result.images, result.labels, images, labels)
    assert np.mean(np.array(score["psnr_images"]) >= 40) >= 0.5


def test_trap_weights_pass_the_image_through_the_convnet(shared_data):
    result, images, labels = one_round(shared_data, "cifar10", "cnn", "trap", TrainingSettings(lr=0.1, batch_size=8))
    score = metrics.score(result.images, result.labels, images, labels)
    assert max(score["psnr_images"]) >= 40


def test_trap_refuses_models_it_cannot_reach():
    with pytest.raises(ValueError, match="cannot reach"):
        TrapAttack(build_model("lenet", 3, 32, 10), torch.rand(8, 3, 32, 32), 10)


def test_unrecovered_placeholders_score_as_failed_images(tmp_path):
    """An update that carries nothing yields black placeholders, each marked and scored 0 dB."""
    from attacker.analytic import TrapReadout

    readout = TrapReadout("w", "b", torch.arange(4), (1, 2, 2))
    result = recover(readout, [{"w": torch.zeros(3, 4), "b": torch.zeros(3)}], count=2)[0]
    assert result.image_status == [UNRECOVERED, UNRECOVERED] and result.images.abs().sum() == 0
    truth = torch.zeros(2, 1, 2, 2)  # black truth: a placeholder would otherwise score 100 dB
    row = score_and_save(result, truth, torch.zeros(2, dtype=torch.long), None)
    assert row["psnr_images"] == [0.0, 0.0] and row["recovered_at_40db"] == 0.0


def test_the_imprint_block_disarmed_is_the_honest_model():
    model = build_model("lenet", 3, 32, 10, seed=2, imprint=16)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), model.base(x))


def test_in_a_federation_a_target_with_more_images_than_the_cap_is_not_read(shared_data, tmp_path, server_identity):
    from clients.app import make_client_app
    from fl_sim.contract.run_config import RunConfig
    from fl_sim.results.outputs import read_jsonl
    from fl_sim.server import server_app

    statuses = {}
    for cap in (16, 40):  # shards of 20-24 images: over the first cap, under the second
        config = RunConfig(out=str(tmp_path / str(cap)), rounds=1, num_clients=2, data_root=str(shared_data),
                           model="lenet", train_mode="epochs", epochs=1, batch_size=8, min_shard=20, max_shard=24,
                           attack="imprint", max_attack_images=cap, seed=0, device="cpu")
        server_app.run_federation(LocalGrid(make_client_app(config), config.num_clients), config)
        rows = [row for row in read_jsonl(tmp_path / str(cap) / "metrics.jsonl") if row.get("client") is not None]
        statuses[cap] = [(row["status"], row.get("reason", "")) for row in rows]
    assert len(statuses[16]) == 2 and all(status == "skipped" and "--max-attack-images 16" in reason
                                          for status, reason in statuses[16])
    assert [status for status, _ in statuses[40]] == ["ok", "ok"]


def test_trap_weights_on_every_client_are_warned_about_by_the_server_app(shared_data, tmp_path, server_identity,
                                                                         monkeypatch):
    from clients.app import make_client_app
    from fl_sim.contract.attacks import TRAP_EVERYONE
    from fl_sim.contract.run_config import RunConfig
    from fl_sim.results.outputs import read_jsonl
    from fl_sim.server import server_app

    warnings = []
    monkeypatch.setattr(server_app, "log", lambda level, message, *args: warnings.append(message % args if args
                                                                                         else message))
    config = RunConfig(out=str(tmp_path / "run"), rounds=1, num_clients=2, data_root=str(shared_data), model="mlp",
                       train_mode="fedsgd", batch_size=4, attack="trap", seed=0, device="cpu")
    server_app.run_federation(LocalGrid(make_client_app(config), config.num_clients), config)
    assert TRAP_EVERYONE in warnings
    assert [row["model_changed"] for row in read_jsonl(tmp_path / "run" / "global.jsonl")] == [False]
