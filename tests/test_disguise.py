"""The disguised attack (attacker/disguise.py, fl_sim/server/disguise.py): its training lowers the decoder's loss, its
readout recovers the one image a unit fired for, its checkpoint loads into an attack whose model strict-loads into
the agreed architecture and reads an aggregate, and a missing or mismatched checkpoint is a one-line error."""
import copy

import numpy as np
import pytest
import torch

from attacker.disguise import (
    Decoder,
    DisguiseConfig,
    disaggregate,
    fit_units,
    kurtosis,
    layer_inputs_of,
    match_features,
    property_scores,
    refit_decoder,
    revive_rows,
    stepped_loss,
    train_step,
    unit_gradients,
)
from clients.detectors.lone_units import lone_unit_shares
from fl_sim.contract.attacks import attack_spec
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.contract.setting import ConfigError
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.results.metrics import psnr
from fl_sim.results.preflight import check_run
from fl_sim.server.attacks import AttackContext, Observed, Victim, build_attack
from fl_sim.server.disguise import BACKBONE_RATE, DisguiseAttack, feature_shape, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def cifar(shared_data):
    images, labels = load_dataset("cifar10", shared_data, train=False).tensors(np.arange(64))
    return images, labels


def config_for(model, images: torch.Tensor, units=(0, 1, 2, 3), expected=(8.0, 4.0, 2.0, 1.0), **changes):
    """A config whose units' thresholds are the images' own property quantiles."""
    scores = property_scores(images, "bright")
    thresholds = [float(torch.quantile(scores, 1 - m / len(images))) for m in expected]
    return DisguiseConfig("cnn", "bright", "classifier.0", list(units), list(expected), thresholds,
                          list(feature_shape(model, "cnn", (3, 32, 32))), [3, 32, 32], round_images=len(images),
                          **{"clients": 1, "width": 8, **changes})


def test_property_scores_rank_the_brightest_and_the_reddest():
    images = torch.full((3, 3, 4, 4), 0.5)
    images[1] += 0.2
    images[2, 0] = 1.0
    assert int(property_scores(images, "bright").argmax()) == 1
    assert int(property_scores(images, "dark").argmax()) == 0
    assert int(property_scores(images, "red").argmax()) == 2
    with pytest.raises(ValueError, match="unknown property"):
        property_scores(images, "shiny")


def test_disaggregate_reads_the_one_image_the_highest_unit_fired_for():
    h = torch.rand(3, 20, dtype=torch.float64)
    g = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    fired = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)  # units x images
    rows, bias = (fired * g) @ h, fired @ g
    features, unit = disaggregate(rows, bias, tolerance=1e-12)
    assert unit == 2
    torch.testing.assert_close(features, h[1])
    assert disaggregate(rows * 0, bias * 0, 1e-12)[1] == -1


def test_the_stability_term_is_the_loss_after_the_clients_own_fedsgd_step_and_trains_the_model(cifar):
    images, labels = cifar
    torch.manual_seed(0)
    model = build_model("cnn", 3, 32, 10)
    config = config_for(model, images, clients=2, lr=0.05)
    after = stepped_loss(model, config, images, labels)
    stepped = copy.deepcopy(model)  # the FedSGD round by hand: two clients' gradients averaged, one step at lr
    grads = [torch.autograd.grad(torch.nn.functional.cross_entropy(stepped(x), y), list(stepped.parameters()))
             for x, y in zip(images.chunk(2), labels.chunk(2), strict=True)]
    with torch.no_grad():
        for index, parameter in enumerate(stepped.parameters()):
            parameter -= 0.05 * (grads[0][index] + grads[1][index]) / 2
        expected = torch.nn.functional.cross_entropy(stepped(images), labels)
    torch.testing.assert_close(after.detach(), expected, rtol=1e-5, atol=1e-6)
    first_conv = next(model.parameters())
    (gradient,) = torch.autograd.grad(after, first_conv)  # differentiable in the model sent (through the step)
    assert gradient.abs().sum() > 0
    decoder = Decoder(config.feature_shape, config.image_shape, config.width)
    _, parts = train_step(model, decoder, config, images, labels, stable=1.0)
    assert parts.stable == pytest.approx(float(expected), rel=1e-4)
    _, off = train_step(model, decoder, config, images, labels)
    assert np.isnan(off.stable)


def test_a_few_training_steps_lower_the_decoders_loss(cifar):
    images, labels = cifar
    torch.manual_seed(0)
    model = build_model("cnn", 3, 32, 10)
    config = config_for(model, images)
    decoder = Decoder(config.feature_shape, config.image_shape, config.width)
    optimizer = torch.optim.Adam([*model.parameters(), *decoder.parameters()], lr=2e-3)

    def losses():
        _, parts = train_step(model, decoder, config, images, labels, autoencoded=64)
        return parts

    before = losses()
    for _ in range(30):
        loss, _ = train_step(model, decoder, config, images, labels, autoencoded=64)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = losses()
    assert after.autoencode < 0.9 * before.autoencode, (before, after)
    assert after.calibrate < 0.5 * before.calibrate, (before, after)


def test_the_attack_sends_the_agreed_architecture_and_reads_an_aggregate(tmp_path, cifar):
    images, labels = cifar
    model = build_model("cnn", 3, 32, 10, seed=1)
    config = config_for(model, images)
    decoder = Decoder(config.feature_shape, config.image_shape, config.width)
    path = tmp_path / "disguise.pt"
    save_checkpoint(path, model, decoder, config)
    run = RunConfig(attack="disguise", model="cnn", disguise_checkpoint=str(path))
    agreed = build_model("cnn", 3, 32, 10)
    attack = build_attack(AttackContext("disguise", run, copy.deepcopy(agreed), (3, 32, 32), 10, torch.device("cpu"),
                                        lambda: images))
    assert isinstance(attack, DisguiseAttack) and attack_spec("disguise").active
    honest = {k: v.clone() for k, v in agreed.state_dict().items()}
    armed = attack.arm(honest, TrainingSettings(lr=0.05, batch_size=16), [0, 1])
    sent = armed.weights[0]
    assert {k: (v.shape, v.dtype) for k, v in sent.items()} == {k: (v.shape, v.dtype) for k, v in honest.items()}
    agreed.load_state_dict(sent, strict=True)  # the agreed architecture holds it exactly
    assert all(torch.equal(sent[k], model.state_dict()[k]) for k in sent)  # the checkpoint's values, first round
    # then the global model, with the round's step (here: from the checkpoint to `honest`) taken at BACKBONE_RATE on
    # the convolutions and the units' rows, in full on the rest
    later = attack.arm(honest, TrainingSettings(lr=0.05, batch_size=16), [0]).weights[0]
    units = torch.zeros(len(honest["classifier.0.bias"]), dtype=torch.bool)
    units[config.units] = True
    for name, value in later.items():
        slowed = sent[name] + BACKBONE_RATE * (honest[name] - sent[name])
        if name.startswith("features."):
            assert torch.allclose(value, slowed) and not torch.equal(value, sent[name]), name
        elif name.startswith("classifier.0."):
            assert torch.allclose(value[units], slowed[units]) and torch.equal(value[~units], honest[name][~units])
        else:
            assert torch.equal(value, honest[name]), name
    assert attack.reader(later) is attack.decoder  # the convolutions moved by 1% of the way: the decoder as trained

    # the round's update of one FedSGD step (lr 0.05) on the images: the decoder reads the one image the top unit fires
    lr = 0.05
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    update = {name: -lr * grads[name] if name in grads else torch.zeros_like(t) for name, t in sent.items()}
    settings = TrainingSettings(lr=lr, batch_size=len(images))
    found = attack.read([Observed(Victim((0, 1), True), update, sent, settings)], armed, seed=0)
    assert len(found) == 1 and found[0].ok and found[0].images.shape == (len(images), 3, 32, 32)
    assert found[0].image_status == ["unconfirmed"] + ["unrecovered"] * (len(images) - 1)
    rows, bias = unit_gradients(model, "classifier.0", config.units, images, labels, 1)
    unit = disaggregate(rows.double(), bias.double(), 4 * config.noise)[1]
    assert unit >= 0
    fired = ((layer_inputs_of(model, "classifier.0", images)[1] @ model.classifier[0].weight[config.units[unit]]
              + model.classifier[0].bias[config.units[unit]]) > 0).nonzero().flatten()
    if len(fired) == 1:  # one image alone: its features exactly, the decoder's image matched to them
        with torch.no_grad():
            decoded = decoder(layer_inputs_of(model, "classifier.0", images[fired])[1])[0]
        assert psnr(found[0].images[0], images[fired][0]) >= psnr(decoded, images[fired][0])


def test_matching_the_layer_input_sharpens_an_image_and_says_how_far_it_is(cifar):
    images, _ = cifar
    model = build_model("cnn", 3, 32, 10, seed=1).eval()
    features = layer_inputs_of(model, "classifier.0", images[:2])[1].detach()
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(images[:2], 4), scale_factor=4,
                                              mode="bilinear").clamp(0, 1)
    for image, h, start in zip(images[:2], features, blurred, strict=True):
        matched, error = match_features(model, "classifier.0", h, start, steps=200)
        _, unmoved = match_features(model, "classifier.0", h, start, steps=0)
        assert psnr(matched, image) > psnr(start, image) + 2  # the features pin down what the blur lost
        assert error < 0.05 * unmoved and matched.min() >= 0 and matched.max() <= 1
    assert all(p.grad is None for p in model.parameters())


def test_fitting_the_units_puts_their_crossings_back_on_the_thresholds_and_changes_nothing_else(cifar):
    images, labels = cifar
    model = build_model("cnn", 3, 32, 10, seed=1).eval()
    config = config_for(model, images, units=(3, 7, 11, 40), expected=(24.0, 12.0, 6.0, 3.0))
    kept = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    index = torch.as_tensor(config.units)

    def error(weight, bias):  # each unit's pre-activation against its target, where it is fitted
        h = layer_inputs_of(model, config.layer, images)[1].detach().double()
        pre = h @ weight[index].double().T + bias[index].double()
        scores = property_scores(images, config.property).double()
        target = (scores[:, None] - torch.tensor(config.thresholds, dtype=torch.float64)) / scores.std()
        return float((pre - target)[target > -1.5].square().mean().sqrt())

    layer = model.classifier[0]
    weight, bias = fit_units(model, config, images, ridge=1e-3, shifts=((0, 0),), peak=1e9)
    assert error(weight, bias) < 0.1 * error(layer.weight, layer.bias)
    bounded, _ = fit_units(model, config, images, ridge=1e-3, shifts=((0, 0),))  # no row above the layer's peak
    assert float(kurtosis(bounded[index]).max()) <= float(kurtosis(layer.weight).max()) + 1e-9
    assert float(kurtosis(weight[index]).max()) > float(kurtosis(layer.weight).max())  # which the free fit passes
    others = torch.ones(len(bias), dtype=torch.bool)
    others[index] = False
    assert torch.equal(weight[others], layer.weight[others]) and torch.equal(bias[others], layer.bias[others])
    assert all(torch.equal(kept[name], tensor) for name, tensor in model.state_dict().items())  # a copy changed
    shifted, _ = fit_units(model, config, images, ridge=1e-3, shifts=((0, 0), (0, 2)), peak=1e9)
    assert not torch.equal(shifted, weight)  # the shifted images are fitted too


def test_the_decoder_is_refit_to_a_model_the_federation_trained_and_kept_for_the_checkpoints_own(cifar):
    images, _ = cifar
    model = build_model("cnn", 3, 32, 10, seed=1)
    config = config_for(model, images)
    torch.manual_seed(0)
    decoder = Decoder(config.feature_shape, config.image_shape, config.width).eval()
    kept = {name: tensor.clone() for name, tensor in decoder.state_dict().items()}
    features = layer_inputs_of(model, config.layer, images)[1].detach()

    def error(reader):
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(reader(features), images))

    fitted = refit_decoder(decoder, model, config.layer, images, steps=40, batch=32, lr=3e-3)
    assert error(fitted) < 0.7 * error(decoder)
    assert all(torch.equal(kept[name], tensor) for name, tensor in decoder.state_dict().items())  # a copy was fit

    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attack = DisguiseAttack(build_model("cnn", 3, 32, 10), state, decoder, config, lambda: images)
    attack.model.load_state_dict(state)
    assert attack.reader(state) is decoder  # the checkpoint's model: its own decoder
    trained = {name: tensor + 0.01 for name, tensor in state.items()}
    attack.model.load_state_dict(trained)
    refit = attack.reader(trained)
    assert refit is not decoder and attack.reader(trained) is refit  # one fit per model sent
    assert DisguiseAttack(build_model("cnn", 3, 32, 10), state, decoder, config).reader(trained) is decoder


def test_a_missing_or_mismatched_checkpoint_is_a_one_line_error(tmp_path, cifar):
    images, _ = cifar
    with pytest.raises(ConfigError, match="does not exist: train one with") as missing:
        check_run(RunConfig(attack="disguise", model="cnn", disguise_checkpoint=str(tmp_path / "none.pt"),
                            out=str(tmp_path / "out")))
    assert "\n" not in str(missing.value)
    with pytest.raises(ConfigError, match="needs --disguise-checkpoint"):
        check_run(RunConfig(attack="disguise", model="cnn", out=str(tmp_path / "out")))
    model = build_model("cnn", 3, 32, 10)
    config = config_for(model, images)
    path = tmp_path / "disguise.pt"
    save_checkpoint(path, model, Decoder(config.feature_shape, config.image_shape, config.width), config)
    with pytest.raises(ConfigError, match="trained for --model cnn, not mlp") as other:
        check_run(RunConfig(attack="disguise", model="mlp", disguise_checkpoint=str(path), out=str(tmp_path / "o")))
    assert "\n" not in str(other.value)
    with pytest.raises(ConfigError, match=r"trained for images \(3, 32, 32\), not \(1, 28, 28\)"):
        load_checkpoint(path, "cnn", (1, 28, 28))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(path, "cnn", (3, 32, 32))


def test_reviving_the_dead_rows_makes_them_fire_for_every_batch_and_keeps_the_logits(cifar):
    """Rows that fire for (almost) no image (here: 40 rows killed by their bias, and the fresh model's rarest) fire
    for almost every image after `revive_rows`, so a batch's lone units (lone-units' statistic) are a smaller share
    of those firing; the units and the other rows are untouched, the rows keep their direction, and the logits' mean
    is kept."""
    images, _ = cifar
    model = build_model("cnn", 3, 32, 10, seed=1).eval()
    config = config_for(model, images, units=(3, 7, 11, 40))
    dead = torch.arange(60, 100)
    with torch.no_grad():
        model.classifier[0].bias[dead] = -1e3
        logits = model(images)
    before = lone_unit_shares(model, images[:16])["classifier.0"]
    rows = model.classifier[0].weight.detach().clone()
    changed = revive_rows(model, config, images)
    assert sorted(changed) == ["classifier.0.bias", "classifier.0.weight", "classifier.2.bias"]
    revived = copy.deepcopy(model)
    revived.load_state_dict(changed, strict=False)
    pre = layer_inputs_of(revived, "classifier.0", images)[1] @ revived.classifier[0].weight.T
    fired = ((pre + revived.classifier[0].bias) > 0).double().mean(0)
    assert float(fired[dead].min()) >= 0.95
    with torch.no_grad():  # the rows revived: those firing for under 5% of the images, the units excepted
        rare = ((layer_inputs_of(model, "classifier.0", images)[1] @ rows.T + model.classifier[0].bias) > 0
                ).double().mean(0) < 0.05
    rare[list(config.units)] = False
    moved = (revived.classifier[0].weight != rows).any(1)
    assert torch.equal(moved, rare) and bool(rare[dead].all())
    assert torch.allclose(torch.nn.functional.cosine_similarity(revived.classifier[0].weight[dead], rows[dead]),
                          torch.ones(len(dead)), atol=1e-5)
    after = lone_unit_shares(revived, images[:16])["classifier.0"]
    assert after < before or before == 0
    with torch.no_grad():
        shift = revived(images) - logits
    assert float(shift.mean(0).abs().max()) < 1e-4 and float(shift.abs().max()) < 0.1 * float(logits.std())
    assert revive_rows(revived, config, images) == {}  # nothing left to revive
