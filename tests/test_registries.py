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


def test_the_contracts_names_are_exactly_what_the_registries_offer():
    """fl_sim/contract names what the registries offer without importing them (it must stay light); they must
    agree."""
    from fl_sim.contract import names
    from fl_sim.contract.attacks import AttackKind, attack_specs
    from fl_sim.contract.models import model_names

    assert model_names() == tuple(MODELS)
    for spec in attack_specs():  # an inversion runs its registered preset; an analytic or active attack has none
        inversion = spec.kind is AttackKind.PASSIVE and spec.factory.endswith(":PassiveInversion")
        assert (spec.preset is not None) == inversion, spec.name
        assert spec.models is None or set(spec.models) <= set(MODELS), spec.name
    for scheme in names.PartitionScheme:  # each splits: an unknown one would say "unknown partition scheme"
        assert len(partition_indices(np.arange(40) % 10, 2, seed=0, scheme=scheme)) == 2
    for name in names.DatasetName:  # each has a loader: an unknown one would say "unknown dataset"
        with pytest.raises(Exception) as error:
            load_dataset(name, "/nonexistent-root-for-this-test")
        assert "unknown dataset" not in str(error.value)


def test_a_models_traits_are_what_its_class_builds():
    """The model registry's traits (fl_sim/contract/models.py) against the built models: batch norm, and the
    layer trap weights rewrite (named by the class), which sees every pixel."""
    from fl_sim.contract.models import ModelTrait, model_specs

    for spec in model_specs():
        model = build_model(spec.name, 1, 12, 10, seed=0)
        has_norm = any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())
        assert has_norm == spec.batchnorm, spec.name
        layer = getattr(model, "TRAP_LAYER", None)
        assert (layer is not None) == (ModelTrait.DENSE_SEES_IMAGE in spec.traits), spec.name
        if layer is not None:
            assert isinstance(model.get_submodule(layer), torch.nn.Linear), spec.name
            assert model.trap_input(torch.rand(2, 1, 12, 12)).shape[1] >= 12 * 12, spec.name


def test_every_registered_attack_names_a_class_that_implements_the_attack_interface():
    import importlib

    from fl_sim.contract.attacks import attack_specs
    from fl_sim.server.attacks import Attack

    for spec in attack_specs():
        module, _, name = spec.factory.partition(":")
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, Attack), spec.name
        assert not getattr(found, "__abstractmethods__", None), f"{spec.factory} leaves methods abstract"
