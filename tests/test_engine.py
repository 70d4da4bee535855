"""The inversion engine: divergence guard, restarts, vectorisation invariance, and real quality."""
import pytest
import torch
from torch import nn

from attacker import AttackConfig, Status, TrainingSettings, engine, get_attack, invert
from clients.training import local_train
from fl_sim.contract.run_config import RunConfig
from fl_sim.learning.data import load_dataset
from fl_sim.learning.models import build_model
from fl_sim.learning.updates import weight_change, weights
from fl_sim.results.metrics import psnr, score
from fl_sim.server.attacks import AttackContext
from fl_sim.server.passive import PassiveInversion


def _victims(model_name, images, labels, settings, init="default"):
    model = build_model(model_name, images.shape[1], images.shape[-1], 10, init=init)
    before, updates = weights(model), []
    for start in range(0, len(images), settings.num_images):
        client = build_model(model_name, images.shape[1], images.shape[-1], 10)
        client.load_state_dict(before)
        batch = slice(start, start + settings.num_images)
        local_train(client, images[batch], labels[batch], settings)
        updates.append(weight_change(before, weights(client)))
    return model, before, updates


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_dataset("mnist", shared_data, train=True)


class LogModel(nn.Module):
    """Takes log(pixels): any step that pushes a pixel below zero makes the loss NaN."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        return self.linear(torch.log(x).flatten(1))


def test_diverged_restarts_are_redrawn_and_never_reported():
    model = LogModel()
    settings = TrainingSettings(lr=0.1)
    before = weights(model)
    client = LogModel()
    client.load_state_dict(before)
    local_train(client, torch.rand(1, 1, 4, 4) + 0.1, torch.tensor([1]), settings)
    update = weight_change(before, weights(client))
    reckless = AttackConfig("reckless", objective="l2", optimizer="adam", labels="analytic", lr=10.0, max_redraws=2)
    [result] = invert(model, before, [update], settings, reckless, image_shape=(1, 4, 4), num_classes=3,
                      iterations=20, device="cpu")
    assert result.status is Status.DIVERGED and not result.ok and "diverged" in result.reason
    assert result.redraws == 2  # re-drawn twice, then given up
    assert result.restart_losses == [float("inf")]


def test_pixels_that_leave_the_image_range_count_as_divergence(mnist):
    """Unboxed iDLG on a noised update fits the noise with pixels in the hundreds; clamped, they once scored
    3 dB as if reconstructed (docs/defenses.md, "What each does to the attack, measured"). Such a row has
    diverged: no result is reported."""
    images, labels = mnist.tensors(range(1))
    settings = TrainingSettings(lr=0.1)
    model, before, [update] = _victims("lenet", images, labels, settings)
    generator = torch.Generator().manual_seed(0)
    noised = {name: tensor + 0.001 * torch.randn(tensor.shape, generator=generator) for name, tensor in update.items()}
    attack = get_attack("idlg", restarts=1, max_redraws=1)
    [result] = invert(model, before, [noised], settings, attack, image_shape=(1, 28, 28), num_classes=10,
                      iterations=10, device="cpu")
    assert result.status is Status.DIVERGED and "pixels left" in result.reason
    assert result.redraws == 1
    [clean] = invert(model, before, [update], settings, attack, image_shape=(1, 28, 28), num_classes=10,
                     iterations=10, device="cpu")
    assert clean.ok and psnr(clean.images, images) > 30  # the guard leaves a converging row alone


def test_the_best_restart_by_the_attacks_own_loss_is_kept(mnist, monkeypatch):
    """The images handed back are those of the restart with the lowest loss, not just its loss."""
    images, labels = mnist.tensors(range(1))
    settings = TrainingSettings(lr=0.1)
    model, before, updates = _victims("lenet", images, labels, settings, init="paper")
    attack = get_attack("ig", restarts=3)
    finished = {}  # (victim, label assignment, restart) -> (optimised variables, loss, redraws), as chunks end
    optimise = engine._optimise

    def spy(*args):
        chunk = optimise(*args)
        finished.update(chunk)
        return chunk

    monkeypatch.setattr(engine, "_optimise", spy)
    [result] = invert(model, before, updates, settings, attack, image_shape=(1, 28, 28), num_classes=10,
                      iterations=10, device="cpu")
    losses = {restart: loss for (_, _, restart), (_, loss, _) in finished.items()}  # K = 1: one assignment
    candidates = {restart: z.view(1, 1, 28, 28).clamp(0, 1) for (_, _, restart), (z, _, _) in finished.items()}
    best = min(losses, key=losses.get)
    assert len(losses) == 3 and len(set(losses.values())) == 3
    assert torch.equal(result.images, candidates[best])
    assert not any(torch.equal(result.images, candidates[r]) for r in candidates if r != best)
    assert result.loss == losses[best] and result.restart_losses == [losses[r] for r in range(3)]


def _alone_or_among_others(mnist, attack_name, iterations, device):
    """Rows are independent: only float rounding of batched kernels differs. L-BFGS's line search can
    amplify it a little in a chaotic early phase, so agreement is asked at 40 dB (0.01 RMS pixel error)."""
    images, labels = mnist.tensors(range(3))
    images = images[:, :, ::2, ::2].contiguous()  # 14 x 14 keeps this fast
    settings = TrainingSettings(lr=0.1)
    model, before, updates = _victims("lenet", images, labels, settings, init="paper")
    attack = get_attack(attack_name, restarts=2)
    common = dict(image_shape=(1, 14, 14), num_classes=10, iterations=iterations, seed=7, device=device)
    together = invert(model, before, updates, settings, attack, **common)
    alone = invert(model, before, updates[1:2], settings, attack, victim_ids=[1], **common)
    chunked = invert(model, before, updates, settings, attack, max_rows=2, **common)
    assert psnr(together[1].images, alone[0].images) > 40
    assert all(psnr(a.images, b.images) > 40 for a, b in zip(together, chunked))
    assert psnr(together[1].images, together[2].images) < 30


@pytest.mark.parametrize("attack_name,iterations", [("ig", 25), ("idlg", 2), ("dlg", 2)])
def test_a_victim_alone_or_among_others_gets_the_same_reconstruction(mnist, attack_name, iterations):
    _alone_or_among_others(mnist, attack_name, iterations, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the same promise on the GPU")
@pytest.mark.parametrize("attack_name,iterations", [("ig", 25), ("idlg", 2), ("dlg", 2)])
def test_a_victim_alone_or_among_others_gets_the_same_reconstruction_on_cuda(mnist, attack_name, iterations):
    _alone_or_among_others(mnist, attack_name, iterations, "cuda")


def test_idlg_recovers_real_mnist_digits(mnist):
    images, labels = mnist.tensors(range(3))
    settings = TrainingSettings(lr=0.1)
    model, before, updates = _victims("lenet", images, labels, settings, init="paper")
    results = invert(model, before, updates, settings, get_attack("idlg", restarts=1), image_shape=(1, 28, 28),
                     num_classes=10, iterations=15, device="cpu")
    scores = [score(r.images, r.labels, images[i:i + 1], labels[i:i + 1]) for i, r in enumerate(results)]
    assert all(s["label_acc"] == 1.0 for s in scores)
    assert min(s["psnr"] for s in scores) > 30, [s["psnr"] for s in scores]


def test_a_malformed_update_fails_alone_and_the_others_go_on(mnist):
    images, labels = mnist.tensors(range(3))
    images = images[:, :, ::2, ::2].contiguous()
    settings = TrainingSettings(lr=0.1)
    model, before, updates = _victims("lenet", images, labels, settings)
    updates[0] = {name: tensor[..., :1] for name, tensor in updates[0].items()}  # wrong shapes
    updates[2] = {name: tensor * float("nan") for name, tensor in updates[2].items()}
    results = invert(model, before, updates, settings, get_attack("ig"), image_shape=(1, 14, 14), num_classes=10,
                     iterations=3, device="cpu")
    assert results[0].status is Status.BAD_UPDATE and "shape" in results[0].reason
    assert results[2].status is Status.BAD_UPDATE and "not finite" in results[2].reason
    assert results[1].ok and results[1].images.shape == (1, 1, 14, 14)


class BuggyModel(nn.Module):
    """A model with a programming error on its training path (the forwards that size memory run
    without gradients): a bug, not a bad victim."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out + self.missing_attribute if torch.is_grad_enabled() else out


def test_a_bug_in_the_attack_raises_instead_of_failing_every_victim():
    model = BuggyModel()
    before = weights(model)
    update = {name: torch.zeros_like(tensor) for name, tensor in before.items()}
    attack = AttackConfig("plain", objective="l2", optimizer="adam", labels="joint")
    with pytest.raises(AttributeError, match="missing_attribute"):
        invert(model, before, [update, update], TrainingSettings(lr=0.1), attack, image_shape=(1, 4, 4),
               num_classes=3, iterations=2, device="cpu")


def test_out_of_memory_isolates_one_victim_then_full_chunks_again(mnist, monkeypatch):
    """A victim that does not fit alone fails with OUT_OF_MEMORY; the chunks after it are full again."""
    images, labels = mnist.tensors(range(6))
    images = images[:, :, ::2, ::2].contiguous()
    settings = TrainingSettings(lr=0.1)
    model, before, updates = _victims("lenet", images, labels, settings)
    real, chunks = engine._optimise, []

    def optimise(problem, rows, *args):
        victims = sorted({v for v, _, _ in rows})
        chunks.append(victims)
        if 1 in victims:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(problem, rows, *args)

    monkeypatch.setattr(engine, "_optimise", optimise)
    results = invert(model, before, updates, settings, get_attack("ig", restarts=1), image_shape=(1, 14, 14),
                     num_classes=10, iterations=2, device="cpu", max_rows=2)
    assert results[1].status is Status.OUT_OF_MEMORY and not results[1].ok
    assert all(r.ok for i, r in enumerate(results) if i != 1)
    assert chunks == [[0, 1], [0], [1], [2, 3], [4, 5]]


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.linear = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.linear(torch.relu(self.norm(self.conv(x))).flatten(1))


def test_the_batchnorm_statistics_term_is_zero_at_the_truth_and_needs_the_statistics():
    """bn_statistics compares the running statistics the client sent with the replay's: nothing at the true
    images, something at others; an update without them cannot be attacked that way."""
    torch.manual_seed(0)
    model, settings = BatchNormNet(), TrainingSettings(lr=0.1, batch_size=2)
    before = weights(model)
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([3, 7])
    client = BatchNormNet()
    client.load_state_dict(before)
    local_train(client, images, labels, settings)
    update = weight_change(before, weights(client))
    attack = get_attack("ig", bn_statistics=1.0)
    names = [name for name, _ in model.named_parameters()]
    params = {n: before[n] for n in names}
    buffers = {n: t for n, t in before.items() if n not in names}
    problem = engine._Problem(model, params, buffers, settings, attack, (3, 8, 8), 10)
    assert set(problem.statistics) == {"norm.running_mean", "norm.running_var"}
    observed = {n: update[n] * problem.scale for n in [*names, *problem.statistics]}
    targets = nn.functional.one_hot(labels, 10).float()

    def term(candidate):
        _, running = problem.replay.run(candidate, targets)
        return float(problem._statistics_loss(running, observed))

    assert term(images) < 1e-10
    assert term(torch.rand(2, 3, 8, 8)) > 1e-4
    without = {n: t for n, t in update.items() if "running" not in n}
    [result] = invert(model, before, [without], settings, attack, image_shape=(3, 8, 8), num_classes=10,
                      iterations=2, device="cpu")
    assert result.status is Status.BAD_UPDATE and "running_mean" in result.reason


def test_label_deals_set_the_rows_of_a_several_step_victim(mnist):
    """--label-deals (RunConfig.label_deals) reaches the engine: a victim of K steps gets one row per deal of its
    recovered labels into the steps (the preset's 8 unless set), times its restarts."""
    images, labels = mnist.tensors(range(4))
    images = images[:, :, ::2, ::2].contiguous()
    settings = TrainingSettings(lr=0.1, local_steps=4, batch_size=1)
    model, before, updates = _victims("lenet", images, labels, settings, init="paper")
    rows = {}
    for deals in (None, 3):
        context = AttackContext("ig", RunConfig(attack="ig", label_deals=deals, iterations=1, restarts=1), model,
                                (1, 14, 14), 10, torch.device("cpu"), lambda: torch.empty(0))
        preset = PassiveInversion.build(context).preset
        stats: dict = {}
        invert(model, before, updates, settings, preset, image_shape=(1, 14, 14), num_classes=10, iterations=1,
               device="cpu", stats=stats)
        rows[deals] = stats["rows"]
    assert rows == {None: 8, 3: 3}
