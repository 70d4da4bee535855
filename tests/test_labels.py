"""Label recovery from the last layer's update, on real MNIST images."""
import pytest

from attacker import TrainingSettings, recover_labels
from clients.training import local_train
from fl_sim.updates import weight_change, weights
from fl_sim.data import load_dataset
from fl_sim.models import build_model


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
