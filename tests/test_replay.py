"""The attacker's replay of local training must reproduce a real client's weight change exactly."""
from dataclasses import replace

import pytest
import torch

from attacker import LocalTraining, TrainingSettings
from clients.training import local_train
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights


def replay_error(model_name: str, settings: TrainingSettings, dtype: torch.dtype) -> tuple[float, str]:
    """The largest relative difference, over the parameters, between a client's weight change and the replay's."""
    model = build_model(model_name, 3, 16, 5, seed=0).to(dtype)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(settings.num_images, 3, 16, 16, generator=generator).to(dtype)
    labels = torch.randint(0, 5, (settings.num_images,), generator=generator)
    before = weights(model)
    local_train(model, images, labels, settings)
    observed = weight_change(before, weights(model))
    assert any(observed[name].abs().max() > 0 for name, _ in model.named_parameters())
    params = {name: before[name] for name, _ in model.named_parameters()}
    replayed = LocalTraining(model, params, settings)(images, torch.nn.functional.one_hot(labels, 5).to(dtype))
    errors = {name: float((replayed[name] - observed[name]).norm() / (observed[name].norm() + 1e-12))
              for name in params}
    worst = max(errors, key=lambda name: errors[name])
    return errors[worst], worst


@pytest.mark.parametrize("model_name", ["lenet", "cnn", "resnet20"])
@pytest.mark.parametrize("steps,batch,epochs,momentum", [(1, 2, 1, 0.0), (3, 2, 1, 0.0), (3, 1, 2, 0.9)])
def test_replay_reproduces_the_client(model_name, steps, batch, epochs, momentum):
    """In float64 the replay and the client agree to rounding. (In float32, several steps of resnet20 on batches of
    two amplify the two computations' different rounding to 1e-3 of a change: the next test takes one step.)"""
    settings = TrainingSettings(lr=0.05, local_steps=steps, batch_size=batch, epochs=epochs, momentum=momentum)
    error, name = replay_error(model_name, settings, torch.float64)
    assert error < 1e-9, (name, error)


@pytest.mark.parametrize("model_name", ["lenet", "cnn", "resnet20"])
def test_replay_reproduces_a_float32_client_step(model_name):
    error, name = replay_error(model_name, TrainingSettings(lr=0.05, local_steps=1, batch_size=4), torch.float32)
    assert error < 1e-4, (name, error)


def test_frozen_batchnorm_is_replayed_with_the_global_running_statistics():
    """A client that freezes batch norm uses (and keeps) the global running statistics; the replay, given
    them, matches it, even on a model object whose own statistics are different."""
    settings = TrainingSettings(lr=0.05, local_steps=2, batch_size=2, batchnorm="frozen")
    model = build_model("resnet20", 3, 16, 5, seed=0)
    generator = torch.Generator().manual_seed(2)
    for module in model.modules():  # statistics of a trained global model, far from the initial 0 and 1
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    images = torch.rand(settings.num_images, 3, 16, 16, generator=generator)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 4]), 5).float()
    before = weights(model)
    local_train(model, images, targets.argmax(1), settings)
    after = weights(model)
    buffers = {name: before[name] for name, _ in model.named_buffers()}
    assert all(torch.equal(after[name], tensor) for name, tensor in buffers.items())
    observed = weight_change(before, after)

    fresh = build_model("resnet20", 3, 16, 5, seed=0)  # running statistics 0 and 1: not the global ones
    params = {name: before[name] for name, _ in fresh.named_parameters()}
    replayed = LocalTraining(fresh, params, settings, buffers)(images, targets)
    as_if_trained = LocalTraining(fresh, params, replace(settings, batchnorm="train"), buffers)(images, targets)
    for name in params:
        error = (replayed[name] - observed[name]).norm() / (observed[name].norm() + 1e-12)
        assert error < 1e-4, (name, float(error))
    assert (as_if_trained["conv1.weight"] - observed["conv1.weight"]).norm() > 0.1 * observed["conv1.weight"].norm()
    with pytest.raises(ValueError, match="batchnorm must be one of train, frozen"):
        TrainingSettings(lr=0.1, batchnorm="eval")


def test_replay_with_wrong_data_differs():
    settings = TrainingSettings(lr=0.1, local_steps=2, batch_size=1)
    model = build_model("lenet", 1, 12, 4, seed=0)
    images = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3])
    before = weights(model)
    local_train(model, images, labels, settings)
    observed = weight_change(before, weights(model))
    params = {name: before[name] for name, _ in model.named_parameters()}
    replayed = LocalTraining(model, params, settings)(images.flip(0), torch.nn.functional.one_hot(labels, 4).float())
    assert not torch.allclose(replayed["classifier.weight"], observed["classifier.weight"], atol=1e-6)


def test_naive_view_is_one_big_step():
    settings = TrainingSettings(lr=0.1, local_steps=5, batch_size=2, epochs=2, momentum=0.9)
    naive = settings.as_single_gradient()
    assert (naive.lr, naive.local_steps, naive.batch_size, naive.epochs, naive.momentum) == (1.0, 1, 10, 1, 0.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        TrainingSettings(lr=0)
    with pytest.raises(ValueError, match="batch-size"):
        TrainingSettings(lr=0.1, batch_size=0)


def test_the_replay_of_an_epochs_client_with_a_short_last_batch_momentum_and_decay_matches_its_training():
    """Epochs mode, n = 10 at B = 4 (batches 4, 4, 2), two epochs in the order the attack assumes."""
    settings = TrainingSettings(lr=0.1, batch_size=4, epochs=2, mode="epochs", momentum=0.5,
                                weight_decay=0.01).for_shard(10)
    model, generator = build_model("lenet", 1, 28, 10, seed=1), torch.Generator().manual_seed(0)
    start = weights(model)
    images, labels = torch.rand(10, 1, 28, 28, generator=generator), torch.randint(0, 10, (10,), generator=generator)
    local_train(model, images, labels, settings)  # no order_seed: the given order, every epoch
    trained = weight_change(start, weights(model))
    names = [name for name, _ in model.named_parameters()]
    replayed = LocalTraining(build_model("lenet", 1, 28, 10, seed=1), {name: start[name] for name in names},
                             settings)(images, torch.nn.functional.one_hot(labels, 10).float())
    for name in names:
        torch.testing.assert_close(replayed[name], trained[name], rtol=1e-4, atol=1e-6)


def test_the_replay_gives_the_running_statistics_a_train_mode_client_sends():
    """Batch norm in train mode: each step blends the batch's mean and unbiased variance into the running
    ones (momentum 0.1); the replay on the true images must reproduce what the client sends back."""
    model = build_model("resnet20", 3, 32, 10, init="default", seed=0)
    before = weights(model)
    images, labels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    settings = TrainingSettings(lr=0.1, local_steps=2, batch_size=2)
    client = build_model("resnet20", 3, 32, 10)
    client.load_state_dict(before)
    local_train(client, images, labels, settings, order_seed=0)
    sent = weights(client)
    names = [name for name, _ in model.named_parameters()]
    replay = LocalTraining(model, {n: before[n] for n in names}, settings,
                           {n: t for n, t in before.items() if n not in names})
    _, running = replay.run(images, torch.nn.functional.one_hot(labels, 10).float())
    assert len(running) == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for name, tensor in running.items():
        assert not torch.allclose(sent[name], before[name])  # the statistics did move
        torch.testing.assert_close(tensor, sent[name], atol=1e-5, rtol=1e-4)
