"""The exact batch attacks: SPEAR reads a linear+ReLU layer's batch exactly (and needs both its sparsity filter and
its bias scale to), fails with a reason on a rank beyond it, and both `spear` and `cocktail` run through
`fl-sim attack` from the registry.

The images are a held-out split of the real data the benchmarks never use: CIFAR-10 images 700-931 of the server's
own (test) split, downsampled to 16 x 16 so one layer's gradient is small and a test takes seconds."""
import json

import torch
import torch.nn.functional as F
from torch import nn

from attacker.cocktail import cocktail, fast_ica
from attacker.spear import _complete, _normal_search, spear
from attacker.spear_pool import distinct_rows, refine
from fl_sim.commands import cli
from fl_sim.learning.data import load_dataset

HELD_OUT = range(700, 932)  # of the cifar10 test split


def held_out_images(shared_data, count: int, offset: int = 0) -> torch.Tensor:
    images, _ = load_dataset("cifar10", shared_data, train=False).tensors(list(HELD_OUT)[offset:offset + count])
    return F.avg_pool2d(images, 2).double()  # 3 x 16 x 16


def layer_gradient(images: torch.Tensor, units: int = 128, seed: int = 0):
    """A linear+ReLU layer (float64) and a head; its weight and bias gradient on `images` with cross-entropy."""
    torch.manual_seed(seed)
    layer = nn.Linear(images[0].numel(), units).double()
    head = nn.Linear(units, 10).double()
    labels = torch.arange(len(images)) % 10
    F.cross_entropy(head(torch.relu(layer(images.flatten(1)))), labels).backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    return layer, layer.weight.grad, layer.bias.grad


def off_rates(layer: nn.Linear, public: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (layer(public.flatten(1)) <= 0).double().mean(0)


def matched_error(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each true input's relative distance to its nearest recovered one."""
    return torch.cdist(truth.flatten(1), found).min(1).values / truth.flatten(1).norm(dim=1)


def run_spear(shared_data, count: int, budget: int = 60_000, **switches):
    images = held_out_images(shared_data, count)
    layer, dw, dc = layer_gradient(images)
    rates = off_rates(layer, held_out_images(shared_data, 100, offset=100))
    [result] = spear([dw], [dc], [(layer.weight.detach(), layer.bias.detach())], off_rates=[rates], budget=budget,
                     **switches)
    return result, images


def test_spear_recovers_a_batch_of_real_images_exactly_from_a_linear_relu_layer(shared_data):
    result, images = run_spear(shared_data, 6)
    assert result.ok, result.reason
    assert result.batch_size == 6, "the batch size is the gradient's rank, read off it"
    assert result.inputs is not None
    error = matched_error(result.inputs, images)
    assert float(error.max()) < 1e-8, f"not exact: relative errors {error.tolist()}"
    nearest = torch.cdist(images.flatten(1), result.inputs).argmin(1)
    assert sorted(nearest.tolist()) == list(range(6)), "each image is recovered once"


def test_without_the_sparsity_filter_the_batch_is_not_recovered(shared_data):
    result, images = run_spear(shared_data, 6, budget=16_384, sparsity_filter=False)
    assert not result.ok or float(matched_error(result.inputs, images).max()) > 1e-2
    assert not result.ok and "consistent" in result.reason  # the ReLU check refuses the wrong batch


def test_without_the_bias_scale_the_batch_is_not_recovered(shared_data):
    result, images = run_spear(shared_data, 6, budget=16_384, bias_scale=False)
    assert not result.ok or float(matched_error(result.inputs, images).max()) > 1e-2
    assert not result.ok and "consistent" in result.reason


def true_directions(shared_data, count: int):
    """A linear+ReLU layer's gradient on `count` held-out images, its U_b and S_b V_b^T, and the true Q."""
    images = held_out_images(shared_data, count)
    torch.manual_seed(0)
    layer = nn.Linear(images[0].numel(), 128).double()
    z = layer(images.flatten(1))
    z.retain_grad()
    F.cross_entropy(nn.Linear(128, 10).double()(torch.relu(z)), torch.arange(count) % 10).backward()
    assert z.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    u, s, vh = torch.linalg.svd(layer.weight.grad, full_matrices=False)
    u, r = u[:, :count], s[:count, None] * vh[:count]
    truth = u.T @ z.grad.T  # dL/dZ = U_b Q: Q's columns, one per image
    return layer, u, r, truth


def test_the_last_direction_follows_from_the_other_b_minus_1_and_the_weights(shared_data):
    layer, u, r, truth = true_directions(shared_data, 6)
    live = torch.ones(128, dtype=torch.bool)
    assert layer.bias.grad is not None
    last = _complete(truth[:, :5], u, r, layer.bias.grad, live, (layer.weight.detach(), layer.bias.detach()))
    assert last is not None, "no direction completed"
    cosine = float((last @ truth[:, 5]).abs() / truth[:, 5].norm())
    assert cosine > 1 - 1e-9, f"the completed direction is not the missing image's: |cos| = {cosine}"


def test_missing_directions_are_found_in_the_known_ones_normal_space(shared_data):
    layer, u, r, truth = true_directions(shared_data, 8)
    live = torch.ones(128, dtype=torch.bool)
    assert layer.bias.grad is not None
    found, zeros = _normal_search(truth[:, :5], u, r, layer.bias.grad, live,
                                  (layer.weight.detach(), layer.bias.detach()))
    assert len(found) and bool((zeros >= 9).all()), "candidates pass the sparsity filter"
    missing = truth[:, 5:] / truth[:, 5:].norm(dim=0)
    cosine = (found @ missing).abs().amax(0)
    # on this small layer one of the three images leaves too few units clearly off for the search
    assert int((cosine > 1 - 1e-9).sum()) >= 2, f"missing directions not among the candidates: |cos| {cosine}"


def test_a_mixture_of_two_images_is_split_into_their_own_directions(shared_data):
    """Two images that leave many of the same units off make mixtures that are zero on nearly as many rows as an
    image's own direction; the pool refits each candidate on its zero rows and splits a mixture in two."""
    _, u, _, truth = true_directions(shared_data, 8)
    rows = u[distinct_rows(u)]
    truth = truth / truth.norm(dim=0)
    off = (rows @ truth).abs() < 1e-9  # (rows, images): the units each image leaves off
    overlap = (off[:, :, None] & off[:, None, :]).sum(0).fill_diagonal_(-1)
    i, j = divmod(int(overlap.argmax()), 8)
    pin = int(((~off[:, i]) & (~off[:, j])).nonzero()[0])  # a row both images switch on
    a, c = float(rows[pin] @ truth[:, i]), float(rows[pin] @ truth[:, j])
    mixture = c * truth[:, i] - a * truth[:, j]  # zero on both images' off rows and on the pinned row
    mixture = mixture / mixture.norm()
    found, zeros = refine(torch.stack([mixture, truth[:, i]]), rows, 8)
    cosine = (found @ truth[:, [i, j]]).abs()
    assert bool((cosine.amax(0) > 1 - 1e-9).all()), f"images {i} and {j} not split out of their mixture: {cosine}"
    assert bool((cosine.amax(1) > 1 - 1e-9).all()), "the mixture itself is still a candidate"
    assert int(zeros.min()) >= int(off[:, [i, j]].sum(0).min()), "an image's direction counts all its zero rows"


def test_a_rank_beyond_reach_fails_with_its_reason_never_a_wrong_batch(shared_data):
    images = held_out_images(shared_data, 200)
    layer, dw, dc = layer_gradient(images, units=128)  # 200 images behind 128 units
    layer_small, dw_small, dc_small = layer_gradient(images[:50], units=128)  # rank 50 > max_rank
    full, large = spear([dw, dw_small], [dc, dc_small], budget=1000, max_rank=40)
    assert not full.ok and full.inputs is None and "rank" in full.reason
    assert not large.ok and large.batch_size == 50 and "above 40" in large.reason


def test_a_budget_too_small_fails_with_its_reason(shared_data):
    images = held_out_images(shared_data, 12)
    layer, dw, dc = layer_gradient(images)
    [result] = spear([dw], [dc], [(layer.weight.detach(), layer.bias.detach())], budget=50)
    assert not result.ok and result.inputs is None and "50 samples" in result.reason


def test_fast_ica_unmixes_independent_sources():
    generator = torch.Generator().manual_seed(0)
    sources = torch.sign(torch.randn(3, 4000, generator=generator, dtype=torch.float64)) * \
        torch.rand(3, 4000, generator=generator, dtype=torch.float64) ** 2  # super-Gaussian
    sources = (sources - sources.mean(1, keepdim=True)) / sources.std(1, keepdim=True)
    mixed = torch.randn(3, 3, generator=generator, dtype=torch.float64) @ sources
    values, vectors = torch.linalg.eigh(mixed @ mixed.T / 4000)
    whitened = (vectors / values.sqrt()).T @ mixed
    unmix, _ = fast_ica(whitened[None])
    correlation = torch.corrcoef(torch.cat([unmix[0] @ whitened, sources]))[:3, 3:].abs()
    assert float(correlation.max(1).values.min()) > 0.99, correlation


def test_cocktail_unmixes_a_batch_of_real_images(shared_data):
    images = held_out_images(shared_data, 8, offset=20)
    _, dw, dc = layer_gradient(images, units=128)
    [result] = cocktail([dw], [dc], image_shape=(3, 16, 16))
    assert result.ok and result.sources == 8 and result.inputs is not None
    mse = torch.cdist(images.flatten(1), result.inputs.clamp(0, 1)).min(1).values ** 2 / images[0].numel()
    psnr = 10 * torch.log10(1 / mse)
    assert float(psnr.median()) > 20, psnr.tolist()


def test_spear_and_cocktail_run_through_fl_sim_attack(shared_data, tmp_path):
    common = ["--dataset", "mnist", "--data-root", str(shared_data), "--model", "mlp", "--train-mode", "fedsgd",
              "--seed", "3", "--device", "cpu"]
    assert cli.main(["attack", *common, "--attack", "spear", "--batch-size", "4", "--num-victims", "2",
                     "--out", str(tmp_path / "spear")]) == 0
    summary = json.loads((tmp_path / "spear" / "summary.json").read_text())
    assert summary["attack"] == "spear" and summary["failed"] == 0
    assert summary["recovered_at_40db"] == 1.0, summary
    assert cli.main(["attack", *common, "--attack", "cocktail", "--batch-size", "8", "--num-victims", "2",
                     "--defense", "secagg-emulated", "--out", str(tmp_path / "cocktail")]) == 0
    summary = json.loads((tmp_path / "cocktail" / "summary.json").read_text())
    assert summary["victims"] == 1 and summary["images"] == 16 and summary["failed"] == 0
