"""Parameter-only active attacks (trap, qbi) on a user's own architecture: strict loading, exact recovery on real
CIFAR-10 through an MLP, the quickstart Net's carried features read exactly, one-line refusals."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacker.carry import CarriedReadout, image_path, unmixed
from fl_sim.contract.attacks import attack_spec
from fl_sim.contract.protocol import TrainingSettings
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weights
from fl_sim.results import metrics
from fl_sim.results.evaluation import mark_unrecovered
from fl_sim.server import active
from fl_sim.server.attacks import AttackContext, Observed, Victim, build_attack
from fl_sim.server.param_only import QbiAttack, TrapAttack, layer_inputs

ATTACKS = {"trap": TrapAttack, "qbi": QbiAttack}


class Net(nn.Module):
    """The layers and forward of Flower's quickstart-pytorch CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.pool, self.conv2 = nn.Conv2d(3, 6, 5), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 400)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 10))


def normalized(model: nn.Module) -> nn.Module:
    """A copy taking [0, 1] images: the quickstart's normalization (0.5, 0.5) as a forward pre-hook."""
    model = copy.deepcopy(model)
    model.register_forward_pre_hook(lambda _module, args: ((args[0] - 0.5) / 0.5,))
    return model


@pytest.fixture(scope="module")
def cifar(shared_data):
    train, test = load_dataset("cifar10", shared_data, True), load_dataset("cifar10", shared_data, False)
    public, _ = test.tensors(np.arange(len(test)))
    return train, public


def one_step(build, attack_class, cifar, batch: int, seed: int = 0):
    """The server arms the user's model; a client loads it strictly and takes one SGD step (plain torch) on
    `batch` held-out training images; the server reads the update."""
    train, public = cifar
    torch.manual_seed(seed)
    user = build()
    attack = attack_class(normalized(user), public, 10, seed=seed)
    settings = TrainingSettings(lr=0.1, batch_size=batch)
    armed = attack.arm(weights(user), settings, [0])
    sent = armed.weights[0]
    client = normalized(build())
    client.load_state_dict(sent, strict=True)
    images, labels = train.tensors(np.random.default_rng(seed).choice(len(train), batch, replace=False))
    optimizer = torch.optim.SGD(client.parameters(), lr=0.1)
    F.cross_entropy(client(images), labels).backward()
    optimizer.step()
    update = {name: tensor - sent[name] for name, tensor in client.state_dict().items()}
    [result] = attack.read([Observed(Victim((0,)), update, sent, settings)], armed, seed)
    return attack, armed, sent, update, result, images, labels


@pytest.mark.parametrize("build", [mlp, Net])
@pytest.mark.parametrize("name", ATTACKS)
def test_armed_weights_load_strictly_into_a_fresh_user_model(build, name):
    user = build()
    attack = ATTACKS[name](normalized(user), torch.rand(64, 3, 32, 32), 10)
    sent = attack.arm(weights(user), TrainingSettings(lr=0.1, batch_size=16), [0]).weights[0]
    fresh = build()
    fresh.load_state_dict(sent, strict=True)
    assert {k: tuple(v.shape) for k, v in sent.items()} == {k: tuple(v.shape) for k, v in user.state_dict().items()}
    assert any(not torch.equal(sent[k], v) for k, v in user.state_dict().items())


@pytest.mark.parametrize("name", ATTACKS)
def test_the_mlp_gives_most_of_a_batch_of_16_exactly(cifar, name):
    shares = []
    for seed in (0, 1):
        *_, result, images, labels = one_step(mlp, ATTACKS[name], cifar, 16, seed)
        row = metrics.score(result.images, result.labels, images, labels)
        mark_unrecovered(row, result.image_status)
        shares.append(np.mean(np.array(row["psnr_images"]) >= 40))
    assert np.mean(shares) >= 0.8, f"{name}: shares at >= 40 dB {shares}"


@pytest.mark.parametrize("name", ATTACKS)
def test_the_quickstart_net_carries_its_features_to_fc1_and_they_are_read_exactly(cifar, name):
    attack, armed, sent, update, result, images, _ = one_step(Net, ATTACKS[name], cifar, 8)
    assert isinstance(armed.readout, CarriedReadout) and attack.layer == "fc1"
    carried = armed.readout.carried
    assert len(carried.features) == 400 and int(carried.regions.any(0).sum()) == 3 * 28 * 28
    model = normalized(Net())
    model.load_state_dict(sent)
    truth = layer_inputs(model, "fc1", images).double()  # what fc1 saw of each victim image
    read = armed.readout.inputs(update)
    errors = [float(((truth - found).norm(dim=1) / truth.norm(dim=1)).min()) for found in read]
    exact = sum(error < 1e-4 for error in errors)
    matched = {int(((truth - found).norm(dim=1)).argmin()) for found, error in zip(read, errors) if error < 1e-4}
    assert exact >= len(read) // 2 and len(matched) >= 4, f"{exact} of {len(read)} rows exact, images {matched}"
    assert result.images.min() >= 0 and result.images.max() <= 1
    # the carried values are the largest pixel of each feature's region: the image read back is no darker
    values = carried.values(truth.float())[0]
    largest = torch.where(carried.regions, images[0].flatten()[None].double(), torch.tensor(-1.0)).amax(1)
    assert torch.allclose(values, largest, atol=1e-5)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the path is read by forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.fc1, self.act, self.fc2 = nn.Flatten(), nn.Linear(3072, 64), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1
        return self.fc2(self.act(self.fc1(self.flat(x))))


@pytest.mark.parametrize(("model", "names"), [
    (Pooled(), ["pool", "AdaptiveAvgPool2d", "whole image"]),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)),
     ["1 (BatchNorm2d)", "batch"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), ["1 (Linear)", "no ReLU"]),
    (nn.Sequential(nn.Flatten(), nn.Linear(3072, 64, bias=False), nn.ReLU(), nn.Linear(64, 10)),
     ["1 (Linear)", "no bias"]),
    (nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Flatten(), nn.Linear(1536, 10)), ["0 (Linear)", "flat vector"]),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(8 * 30 * 30, 32), nn.ReLU()),
     ["1 (Sigmoid)"]),
])
@pytest.mark.parametrize("name", ATTACKS)
def test_a_model_out_of_reach_is_refused_in_one_line_naming_the_layer(model, names, name):
    with pytest.raises(ValueError) as caught:
        ATTACKS[name](normalized(model), torch.rand(8, 3, 32, 32), 10)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{name} cannot reach")
    for part in names:
        assert part in message


def test_the_path_is_read_by_fx_and_by_hooks_when_fx_cannot_trace():
    path = image_path(Net(), (3, 32, 32))
    assert path.traced and path.layer == "fc1" and path.relu
    assert [step.kind for step in path.steps] == ["conv", "relu", "maxpool", "conv", "relu", "maxpool", "flatten"]
    hooked = image_path(Branchy(), (3, 32, 32))
    assert not hooked.traced and hooked.layer == "fc1" and [step.kind for step in hooked.steps] == ["flatten"]


def test_fl_sims_own_models_keep_their_trap_and_qbi_reaches_them(shared_data):
    model = build_model("mlp", 1, 28, 10, seed=0)
    public = torch.rand(256, 1, 28, 28)
    settings = TrainingSettings(lr=0.1, batch_size=8)
    old = active.TrapAttack(copy.deepcopy(model), public, 10).arm(weights(model), settings, [0]).weights[0]
    new = TrapAttack(copy.deepcopy(model), public, 10).arm(weights(model), settings, [0]).weights[0]
    assert all(torch.equal(old[k], new[k]) for k in old)
    armed = QbiAttack(copy.deepcopy(model), public, 10).arm(weights(model), settings, [0])
    assert isinstance(armed.readout, CarriedReadout) and armed.readout.carried.exact


def test_qbi_is_registered_and_built_through_the_registry():
    spec = attack_spec("qbi")
    assert spec.active and not spec.averages_targets and not spec.may_run_async
    user = mlp()
    context = AttackContext("qbi", RunConfig(attack="qbi"), normalized(user), (3, 32, 32), 10, torch.device("cpu"),
                            lambda: torch.rand(64, 3, 32, 32))
    assert isinstance(build_attack(context), QbiAttack)


def test_mixtures_are_dropped_and_single_images_kept():
    a, b, c = torch.rand(3, 300, generator=torch.Generator().manual_seed(0)).double()
    # best-measured first: a mixture of two found images, and an image with a trace of another, go
    assert unmixed([a, b, (a + b) / 2, c, 1.02 * c - 0.02 * a]) == [0, 1, 3]
    # a mixture measured better than its own images goes too; the images stay
    assert unmixed([(a + b) / 2, a, b]) == [1, 2]
    # of an image and the same image with a trace of another, one is kept
    assert unmixed([a, b, 1.02 * c - 0.02 * a, c]) == [0, 1, 2]
