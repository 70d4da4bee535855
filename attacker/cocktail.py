"""Cocktail-party-class batch recovery: independent component analysis of a linear layer's weight gradient.

The rows of a linear layer's weight gradient dW = G X^T are mixtures of the batch's inputs x_j (each row one
unit's mix, weights G), so un-mixing them is blind source separation (after Kariyappa, Guo, Piercy, Sen, Qureshi
and Ozer, "Cocktail Party Attack: Breaking Aggregation-Based Privacy in Federated Learning using Independent
Component Analysis", ICML 2023): the pixels are the samples, the rows the mixtures. The rows are centred and
whitened onto the gradient's k leading directions (k its rank, at most the layer's live units), FastICA
(symmetric, log-cosh contrast) turns the whitened rows into k maximally non-Gaussian sources, and the bias
gradient dc = G 1 fixes each source's scale and sign exactly as it does for SPEAR: with M the mixing matrix
the un-mixing implies, dc = M D^{-1} 1 gives D. Unlike SPEAR it takes any batch up to the layer's width and the
mean of many clients' updates (secure aggregation's) alike, and it is approximate: the images are only as
independent as natural images are. Pure torch; every victim of one rank is un-mixed in one batched iteration.
"""
from dataclasses import dataclass

import torch

from .spear import gradient_rank

ICA_ITERATIONS = 400
ICA_TOLERANCE = 1e-7


@dataclass
class CocktailResult:
    """One gradient's un-mixed inputs (k, features), k the sources found (the rank), or a reason."""

    inputs: torch.Tensor | None
    sources: int
    reason: str = ""
    iterations: int = 0

    @property
    def ok(self) -> bool:
        return self.inputs is not None


def fast_ica(z: torch.Tensor, iterations: int = ICA_ITERATIONS, tolerance: float = ICA_TOLERANCE,
             seed: int = 0) -> tuple[torch.Tensor, int]:
    """Symmetric FastICA on whitened data (log-cosh contrast).

    Parameters
    ----------
    z : Tensor
        (victims, k, samples) whitened rows: zero mean, identity covariance.
    iterations, tolerance : int, float
        At most this many fixed-point steps; stop when every unmixing row moves less than `tolerance`.
    seed : int
        Fixes the random start.

    Returns
    -------
    (Tensor, int)
        The orthogonal unmixing matrices (victims, k, k), sources = W z; and the steps taken.
    """
    victims, k, samples = z.shape
    generator = torch.Generator().manual_seed(seed)
    w = _decorrelate(torch.randn(victims, k, k, generator=generator, dtype=z.dtype))
    step = 0
    for step in range(1, iterations + 1):  # noqa: B007 (the count of steps taken is returned)
        y = w @ z
        t = torch.tanh(y)
        new = t @ z.transpose(1, 2) / samples - (1 - t ** 2).mean(2, keepdim=True) * w
        new = _decorrelate(new)
        change = ((new * w).sum(2).abs() - 1).abs().amax()
        w = new
        if float(change) < tolerance:
            break
    return w, step


def _decorrelate(w: torch.Tensor) -> torch.Tensor:
    """(W W^T)^{-1/2} W: the nearest orthogonal matrix's rows."""
    values, vectors = torch.linalg.eigh(w @ w.transpose(1, 2))
    return vectors @ torch.diag_embed(values.clamp_min(1e-300).rsqrt()) @ vectors.transpose(1, 2) @ w


def cocktail(weight_grads: list[torch.Tensor], bias_grads: list[torch.Tensor], *, max_sources: int | None = None,
             image_shape: tuple[int, int, int] | None = None,
             seed: int = 0, iterations: int = ICA_ITERATIONS) -> list[CocktailResult]:
    """Each gradient's batch of layer inputs, un-mixed by ICA (see the module docstring).

    Parameters
    ----------
    weight_grads, bias_grads : list of Tensor
        Per victim, the layer's weight gradient (units, features) and bias gradient (units,), or one common
        multiple of both (a weight change, a mean of several clients' weight changes).
    max_sources : int, optional
        Un-mix at most this many sources (the images behind the update, when the server knows it).
    seed : int
        Fixes FastICA's start.
    iterations : int
        FastICA's most steps.

    Returns
    -------
    list of CocktailResult
        One per victim, in order.
    """
    results: list[CocktailResult | None] = [None] * len(weight_grads)
    groups: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for index, (dw, dc) in enumerate(zip(weight_grads, bias_grads, strict=True)):
        dw, dc = dw.detach().double().cpu(), dc.detach().double().cpu()
        live = (dw.abs().amax(1) > 0) | (dc != 0)
        if not bool(live.any()):
            results[index] = CocktailResult(None, 0, "the layer's gradient is zero: no example reached it")
            continue
        dw, dc = dw[live], dc[live]
        centred = _innovations(dw, image_shape) if image_shape is not None else dw - dw.mean(1, keepdim=True)
        u, s, vh = torch.linalg.svd(centred, full_matrices=False)
        k = min(gradient_rank(s), len(s))
        if max_sources is not None:
            k = min(k, max_sources)
        if k < 1:
            results[index] = CocktailResult(None, 0, "the gradient has rank 0")
            continue
        samples = centred.shape[1]
        z = vh[:k] * samples ** 0.5  # whitened rows (k, pixels)
        a = u[:, :k] * s[:k] / samples ** 0.5  # centred dW = a z
        groups.setdefault(k, []).append((index, z, a, dw, dc))
    for k, group in groups.items():
        w, steps = fast_ica(torch.stack([item[1] for item in group]), iterations, seed=seed)
        for (index, _, a, dw, dc), unmix in zip(group, w):
            mixing = a @ unmix.T  # (units, k): each source's direction in the units, up to scale
            sources = torch.linalg.pinv(mixing) @ dw  # the sources themselves (k, features), unfiltered
            inverse_scale = torch.linalg.lstsq(mixing, dc[:, None]).solution[:, 0]  # D^{-1} 1
            if bool((inverse_scale.abs() < 1e-12 * inverse_scale.abs().max().clamp_min(1e-300)).any()):
                results[index] = CocktailResult(None, k, "a source's bias gradient is zero: its scale is unknown",
                                                steps)
                continue
            results[index] = CocktailResult(sources / inverse_scale[:, None], k, "", steps)
    return [result for result in results if result is not None]


def _innovations(rows: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Each row (an image's mixture) as its horizontal and vertical pixel differences: a linear filter, so the
    mixing is the same, while the differences of natural images are far more independent and non-Gaussian
    (sparse edges) than their pixels."""
    images = rows.reshape(len(rows), *image_shape)
    across = images[..., :, 1:] - images[..., :, :-1]
    down = images[..., 1:, :] - images[..., :-1, :]
    return torch.cat([across.flatten(1), down.flatten(1)], 1)
