import numpy as np
import pytest
import torch

from fl_sim.learning.data import DataNotFoundError, load_dataset
from fl_sim.learning.models import MODELS, build_model, count_parameters
from fl_sim.learning.partition import partition_indices


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 10), (3, 8, 3)])
def test_every_model_builds_for_any_shape(name, channels, size, classes):
    model = build_model(name, channels, size, classes, seed=1)
    assert model(torch.rand(2, channels, size, size)).shape == (2, classes)


def test_paper_init_draws_from_uniform_half():
    model = build_model("lenet", 3, 32, 10, init="paper")
    values = torch.cat([p.flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5 and values.std() > 0.25  # U(-.5,.5) has std 0.289


def test_models_are_seeded_and_sizes_are_ordered():
    a, b = build_model("cnn", 3, 32, 10, seed=3), build_model("cnn", 3, 32, 10, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    sizes = {name: count_parameters(build_model(name, 3, 32, 10)) for name in MODELS}
    assert sizes["resnet18"] > 10e6 > sizes["resnet20"] > 0.2e6


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    source = build_model("lenet", 1, 28, 10, seed=5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model("lenet", 1, 28, 10, init=str(tmp_path / "w.pt"), seed=9)
    assert all(torch.equal(x, y) for x, y in zip(source.parameters(), loaded.parameters()))
    with pytest.raises(ValueError, match="holds the weights of another model"):
        build_model("lenet", 3, 32, 10, init=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 3, 32, 10)


def test_real_mnist_and_cifar_subset(shared_data):
    mnist = load_dataset("mnist", shared_data, train=False)
    images, labels = mnist.tensors([0, 1])
    assert len(mnist) == 10000 and images.shape == (2, 1, 28, 28) and labels.tolist() == [7, 2]
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.9
    cifar = load_dataset("cifar10", shared_data, train=True)
    assert (cifar.channels, cifar.image_size, cifar.num_classes) == (3, 32, 10) and len(cifar) == 3728


def test_image_folder_and_missing_data(tiny_image_folder, tmp_path):
    data = load_dataset("imagefolder", tiny_image_folder)
    images, labels = data.tensors(np.arange(len(data)))
    assert images.shape == (18, 3, 8, 8) and sorted(set(labels.tolist())) == [0, 1, 2]
    with pytest.raises(DataNotFoundError, match="--data-root"):
        load_dataset("imagefolder", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", tmp_path)


def test_the_run_configs_names_are_exactly_what_the_registries_offer():
    """fl_sim/contract/run_config.py's enums name what the registries offer without importing them (it must stay
    light); they must agree."""
    from attacker import PRESETS
    from fl_sim.contract import run_config
    from fl_sim.contract.attacks import AttackKind, attack_specs

    assert set(run_config.ModelName) == set(MODELS)
    inversions = {spec.name for spec in attack_specs()
                  if spec.kind is AttackKind.PASSIVE and spec.factory.endswith(":PassiveInversion")}
    assert inversions == set(PRESETS)  # every preset is an attack, and every passive inversion a preset
    for spec in attack_specs():
        assert spec.models is None or set(spec.models) <= set(MODELS), spec.name
    for scheme in run_config.PartitionScheme:  # each splits: an unknown one would say "unknown partition scheme"
        assert len(partition_indices(np.arange(40) % 10, 2, seed=0, scheme=scheme)) == 2
    for name in run_config.DatasetName:  # each has a loader: an unknown one would say "unknown dataset"
        with pytest.raises(Exception) as error:
            load_dataset(name, "/nonexistent-root-for-this-test")
        assert "unknown dataset" not in str(error.value)


def test_every_registered_attack_names_a_class_that_implements_the_attack_interface():
    import importlib

    from fl_sim.contract.attacks import attack_specs
    from fl_sim.server.attacks import Attack

    for spec in attack_specs():
        module, _, name = spec.factory.partition(":")
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, Attack), spec.name
        assert not getattr(found, "__abstractmethods__", None), f"{spec.factory} leaves methods abstract"
