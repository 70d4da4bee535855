"""Label recovery from the last layer's update, on real MNIST images."""
import pytest
import torch

from attacker import TrainingSettings, recover_labels
from attacker.labels import label_assignments
from clients.training import local_train
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_dataset("mnist", shared_data, train=True)


def _update(model, images, labels, settings):
    before = weights(model)
    client = build_model("lenet", 1, 28, 10)
    client.load_state_dict(before)
    local_train(client, images, labels, settings)
    return before, weight_change(before, weights(client))


@pytest.mark.parametrize("model_name,init", [("lenet", "paper"), ("cnn", "default"), ("mlp", "default")])
def test_single_image_label_is_exact(mnist, model_name, init):
    model = build_model(model_name, 1, 28, 10, init=init)
    settings = TrainingSettings(lr=0.1)
    for index in range(20):
        images, labels = mnist.tensors([index])
        before = weights(model)
        client = build_model(model_name, 1, 28, 10)
        client.load_state_dict(before)
        local_train(client, images, labels, settings)
        update = weight_change(before, weights(client))
        recovered = recover_labels(model, before, update, settings, (1, 28, 28), 10)
        assert recovered.tolist() == labels.tolist(), index


def test_batch_label_counts_on_an_untrained_model(mnist):
    """Batches of 4 and 8 with repeated classes: the counts come out right on most batches."""
    model = build_model("lenet", 1, 28, 10, init="paper")
    right = total = 0
    for batch in (4, 8):
        settings = TrainingSettings(lr=0.1, batch_size=batch)
        for start in range(0, 10 * batch, batch):
            images, labels = mnist.tensors(range(start, start + batch))
            before, update = _update(model, images, labels, settings)
            recovered = recover_labels(model, before, update, settings, (1, 28, 28), 10)
            right += recovered.tolist() == sorted(labels.tolist())
            total += 1
    assert right / total >= 0.9, f"{right}/{total} batches fully right"


def test_multi_step_label_counts(mnist):
    """3 steps of 2 images at a small learning rate: the model barely moves and the counts hold."""
    model = build_model("lenet", 1, 28, 10)
    settings = TrainingSettings(lr=0.01, local_steps=3, batch_size=2)
    right = 0
    for start in range(0, 60, 6):
        images, labels = mnist.tensors(range(start, start + 6))
        before, update = _update(model, images, labels, settings)
        right += recover_labels(model, before, update, settings, (1, 28, 28), 10).tolist() == sorted(labels.tolist())
    assert right >= 9, f"{right}/10 multi-step batches fully right"


def test_label_assignments_are_distinct_deals_into_steps_sorted_first():
    labels = torch.tensor([1, 1, 3, 5])  # the recovered multiset, sorted
    deals = label_assignments(labels, steps=2, batch=2, limit=100, seed=0)
    assert deals[0].tolist() == [1, 1, 3, 5]
    steps = {tuple(tuple(sorted(d[s * 2:(s + 1) * 2].tolist())) for s in range(2)) for d in deals}
    assert len(steps) == len(deals) == 4  # {11|35, 13|15, 15|13, 35|11}
    assert all(sorted(d.tolist()) == [1, 1, 3, 5] for d in deals)
    assert len(label_assignments(torch.arange(10), steps=5, batch=2, limit=8, seed=0)) == 8
    assert len(label_assignments(labels, steps=1, batch=4, limit=8, seed=0)) == 1


def test_the_attack_finds_which_label_was_in_which_step(mnist):
    """Two steps whose labels are not in sorted order: the sorted deal replays the wrong steps, and
    the attack's own loss picks the right one (labels come back in step order)."""
    from attacker import get_attack, invert

    model = build_model("lenet", 1, 28, 10)
    settings = TrainingSettings(lr=0.01, local_steps=2)
    images, labels = mnist.tensors(range(2))
    if labels[0] < labels[1]:
        images, labels = images.flip(0), labels.flip(0)
    before, update = _update(model, images, labels, settings)
    [result] = invert(model, before, [update], settings, get_attack("idlg", restarts=1), image_shape=(1, 28, 28),
                      num_classes=10, iterations=3, device="cpu")
    assert len(result.restart_losses) == 2
    assert result.labels.tolist() == labels.tolist()
