"""The FedAvg attack (attacker/fedavg.py): per-epoch copies replay a reshuffling client exactly, the epoch
prior does not see the order within a copy, the copies merge back into the images, and labels are counted
along the client's steps."""
import pytest
import torch

from attacker import LocalTraining, TrainingSettings
from attacker.fedavg import deal_labels, epoch_prior, merge_copies, tie_copies
from attacker.labels import mean_softmax, path_mean_softmax
from clients.training import local_train
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights


def _client_orders(count: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The client's private shuffle (clients/training.py draws one randperm per epoch from its seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(count, generator=generator) for _ in range(epochs)]


@pytest.mark.parametrize("model_name", ["lenet", "cnn"])
def test_per_epoch_copies_reproduce_a_reshuffling_client(model_name):
    """Epochs mode with momentum and a short last batch (5 images in batches of 2): given each epoch's copy in
    that epoch's order, the replay reproduces the client's update; one order for every epoch does not."""
    settings = TrainingSettings(lr=0.05, batch_size=2, epochs=3, momentum=0.9, mode="epochs", weight_decay=1e-3)
    model = build_model(model_name, 3, 16, 5, seed=0)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 5, (5,), generator=generator)
    before = weights(model)
    local_train(model, images, labels, settings, order_seed=7)
    observed = weight_change(before, weights(model))

    settings = settings.for_shard(5)
    params = {name: before[name] for name, _ in model.named_parameters()}
    replay = LocalTraining(model, params, settings)
    orders = _client_orders(5, 3, 7)
    copies = torch.cat([images[order] for order in orders])
    targets = torch.nn.functional.one_hot(torch.cat([labels[order] for order in orders]), 5).float()
    replayed = replay(copies, targets)
    one_order = replay(images, torch.nn.functional.one_hot(labels, 5).float())
    for name in params:
        error = (replayed[name] - observed[name]).norm() / (observed[name].norm() + 1e-12)
        assert error < 1e-4, (name, float(error))
    wrong = sum(float((one_order[name] - observed[name]).norm()) for name in params)
    assert wrong > 1e-3 * sum(float(observed[name].norm()) for name in params)
    with pytest.raises(ValueError, match="one copy per epoch"):
        replay(images[:4], targets[:4])


def test_the_epoch_prior_ignores_the_order_within_a_copy():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 4, 4, generator=generator)
    labels = torch.tensor([0, 1, 1, 2, 0, 1])
    dealt = deal_labels(labels, 3, seed=5)
    assert all(sorted(dealt[e * 6:(e + 1) * 6].tolist()) == sorted(labels.tolist()) for e in range(3))
    # the same set in three orders, each image with its label: the truth, and the prior's minimum
    orders = _client_orders(6, 3, 3)
    copies = torch.stack([images[order] for order in orders])
    targets = torch.nn.functional.one_hot(torch.stack([labels[order] for order in orders]), 3).float()
    assert float(epoch_prior(copies, targets)) < 1e-12
    # reordering one copy changes nothing; changing one image of it does
    shuffled = copies.clone()
    shuffled[1] = copies[1][torch.tensor([5, 4, 3, 2, 1, 0])]
    shuffled_targets = targets.clone()
    shuffled_targets[1] = targets[1][torch.tensor([5, 4, 3, 2, 1, 0])]
    assert float(epoch_prior(shuffled, shuffled_targets)) < 1e-12
    changed = copies.clone()
    changed[2, 0] = torch.rand(1, 4, 4, generator=generator)
    assert float(epoch_prior(changed, targets)) > 1e-4
    # unlike the same images in one order for all epochs, with the labels dealt differently: a class's mean moves
    assert float(epoch_prior(images.expand(3, -1, -1, -1, -1), targets)) > 1e-4


def test_a_tied_start_is_one_set_of_images_in_each_copy_s_label_order():
    """The start the attack draws for epoch copies: every copy holds the first copy's images, each image with
    its label, so the epoch prior is zero there and merging gives back the first copy."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    dealt = deal_labels(labels, 4, seed=3).reshape(4, 6)
    targets = torch.nn.functional.one_hot(dealt, 3).float()
    drawn = torch.rand(4, 6, 1, 3, 3, generator=generator)
    tied = tie_copies(drawn, targets)
    assert torch.equal(tied[0], drawn[0])
    assert float(epoch_prior(drawn, targets)) > 1e-3
    assert float(epoch_prior(tied, targets)) < 1e-12
    for e in range(1, 4):  # the same images, rearranged, each keeping its label
        assert sorted(tied[e].flatten(1).sum(1).tolist()) == pytest.approx(sorted(drawn[0].flatten(1).sum(1).tolist()))
        for c in range(3):
            assert sorted(tied[e][dealt[e] == c].flatten(1).sum(1).tolist()) == \
                pytest.approx(sorted(drawn[0][dealt[0] == c].flatten(1).sum(1).tolist()))
    merged, _ = merge_copies(tied.flatten(0, 1), dealt.flatten(), 4)
    assert torch.allclose(merged, drawn[0])


def test_merging_the_copies_gives_back_the_images_and_their_labels():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(8, 1, 5, 5, generator=generator)
    labels = torch.tensor([3, 1, 1, 0, 3, 3, 2, 1])
    orders = _client_orders(8, 4, 2)
    noisy = torch.cat([images[order] + 0.01 * torch.randn(8, 1, 5, 5, generator=generator) for order in orders])
    merged, merged_labels = merge_copies(noisy, torch.cat([labels[order] for order in orders]), 4)
    first = orders[0]
    assert torch.equal(merged_labels, labels[first])
    assert float((merged - images[first]).abs().max()) < 0.03  # the noise averaged over four copies


def test_path_label_recovery_is_the_global_one_for_one_step_and_moves_with_the_client():
    model = build_model("lenet", 1, 8, 4, seed=0)
    params = {name: tensor.detach() for name, tensor in model.named_parameters()}
    one_step = TrainingSettings(lr=0.1, batch_size=4)
    update = {name: torch.randn_like(tensor) for name, tensor in params.items()}
    at_global = mean_softmax(model, params, (1, 8, 8))
    assert torch.allclose(path_mean_softmax(model, params, update, one_step, (1, 8, 8)), at_global, atol=1e-6)
    many = TrainingSettings(lr=0.1, batch_size=2, epochs=4, mode="epochs", shard_size=8)
    moved = path_mean_softmax(model, params, update, many, (1, 8, 8))
    assert float((moved - at_global).abs().max()) > 1e-3
    assert torch.allclose(moved.sum(), torch.tensor(1.0), atol=1e-5)


def test_the_truth_fits_the_fedavg_attacks_model_of_the_update_and_not_ig_s():
    """The client's images in its own per-epoch orders score zero under the fedavg attack's loss (update
    distance and epoch prior; TV off); the same images in one order for every epoch (ig's replay) do not.
    Then the whole attack runs on the update: n images and n labels come back, each a recovered label."""
    from dataclasses import replace

    from attacker import get_attack, invert
    from attacker.engine import _Problem

    settings = TrainingSettings(lr=0.1, batch_size=2, epochs=3, mode="epochs", momentum=0.5)
    model = build_model("lenet", 1, 8, 3, seed=0)
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(5, 1, 8, 8, generator=generator)
    labels = torch.tensor([0, 2, 1, 2, 0])
    before = weights(model)
    local_train(model, images, labels, settings, order_seed=11)
    update = weight_change(before, weights(model))
    settings = settings.for_shard(5)
    params = {name: before[name] for name, _ in model.named_parameters()}
    observed = {name: update[name].unsqueeze(0) * (-1 / settings.lr) for name in params}
    orders = _client_orders(5, 3, 11)

    def loss_at(attack: str, pictures: torch.Tensor, targets: torch.Tensor) -> float:
        problem = _Problem(model, params, {}, settings, replace(get_attack(attack), tv_weight=0.0), (1, 8, 8), 3)
        _, value = problem.batched(pictures.reshape(1, -1), targets.unsqueeze(0), observed)
        return float(value[0])

    copies = torch.cat([images[order] for order in orders])
    one_hot = torch.nn.functional.one_hot
    assert loss_at("fedavg", copies, one_hot(torch.cat([labels[o] for o in orders]), 3).float()) < 1e-5
    assert loss_at("ig", images, one_hot(labels, 3).float()) > 1e-3

    [found] = invert(model, before, [update], settings, get_attack("fedavg"), image_shape=(1, 8, 8), num_classes=3,
                     iterations=3, device="cpu")
    assert found.ok and found.images.shape == (5, 1, 8, 8) and found.labels.shape == (5,)
    assert float(found.images.min()) >= 0 and float(found.images.max()) <= 1
