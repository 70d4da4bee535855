"""Scoring without a truth channel: each reconstruction against its nearest image of a reference set.

A user's own ClientApp sends the server nothing of what it trained on. In a simulation the auditor holds the
federation's data, though: the data set the clients partition. `nearest_scores` scores each reconstructed image
against the reference image closest to it (least squared error), so a reconstruction that is one of the
clients' images scores as if matched to its truth, and one that is not scores against the best it resembles.

What the figures mean, against the optimal matching of fl_sim/results/metrics.py:
- `psnr_images`: each reconstruction's PSNR against its nearest reference image, in the reconstructions' order;
- `recovered_at_<T>db`: the distinct reference images some reconstruction reaches at >= T dB, over the images
  behind the update (its `count`, the client's num-examples): two reconstructions of one image count once, and an
  update of n images whose reconstruction holds fewer counts the missing ones as not recovered;
- `label_share`: the reconstructions whose label is their nearest image's label (attacks that recover labels).
A reference set that does not hold the clients' images makes every figure a lower bound of nothing: the
metrics row says what it was scored against (`scored_against`).
"""
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fl_sim.results import metrics
from fl_sim.results.rows import RECOVERED_DB, recovered_key

__all__ = ["Reference", "nearest", "nearest_scores"]

CANDIDATES = 8  # the closest images by the fast (expanded) distance, re-scored exactly
CHUNK = 4096  # reference images per matrix product


@dataclass(frozen=True)
class Reference:
    """The images a reconstruction is scored against: (N, C, H, W) as uint8, their labels, and a name."""

    pixels: torch.Tensor
    labels: torch.Tensor
    name: str

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor | None, name: str) -> "Reference":
        """From images in [0, 1] (kept as uint8: a 50,000-image CIFAR-10 is 150 MB)."""
        if images.dim() != 4:
            raise ValueError(f"reference images must be (N, C, H, W), got a tensor of shape {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("the reference set holds no images")
        pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
        found = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        return cls(pixels, found.long().cpu(), name)

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.pixels[indices].float().div(255)


def nearest(images: torch.Tensor, reference: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's nearest reference image (its index) and the mean squared error to it.

    Candidates come from the expanded distance |a|^2 + |b|^2 - 2ab in chunks (float32: too coarse to tell 40 dB
    from 45 dB on its own), and the closest `CANDIDATES` are re-scored exactly."""
    if images.shape[1:] != reference.pixels.shape[1:]:
        raise ValueError(f"reconstructions of shape {tuple(images.shape[1:])} cannot be compared with reference "
                         f"images of shape {tuple(reference.pixels.shape[1:])}")
    flat = images.detach().float().cpu().flatten(1)
    best = torch.full((len(flat), 0), 0.0), torch.zeros((len(flat), 0), dtype=torch.long)
    squared = flat.pow(2).sum(1, keepdim=True)
    for start in range(0, len(reference), CHUNK):
        chunk = reference.pixels[start:start + CHUNK].float().div(255).flatten(1)
        distance = squared + chunk.pow(2).sum(1)[None, :] - 2 * flat @ chunk.T
        take = min(CANDIDATES, distance.shape[1])
        values, indices = distance.topk(take, dim=1, largest=False)
        merged = torch.cat([best[0], values], 1), torch.cat([best[1], indices + start], 1)
        keep = merged[0].topk(min(CANDIDATES, merged[0].shape[1]), dim=1, largest=False).indices
        best = merged[0].gather(1, keep), merged[1].gather(1, keep)
    candidates = best[1]
    exact = (reference.images(candidates.flatten()).flatten(1).view(len(flat), candidates.shape[1], -1)
             - flat[:, None, :]).pow(2).mean(2)
    chosen = exact.argmin(1)
    return candidates.gather(1, chosen[:, None]).squeeze(1), exact.gather(1, chosen[:, None]).squeeze(1)


def nearest_scores(images: torch.Tensor, labels: torch.Tensor | None, reference: Reference,
                   count: int) -> tuple[dict, torch.Tensor]:
    """The scores of one victim's reconstructed `images` against their nearest reference images (the module
    docstring says what each figure means), by their metrics-row names; and those nearest images, in the
    reconstructions' order (the gallery shows them beside the reconstructions).

    Parameters
    ----------
    images
        The reconstruction, (K, C, H, W) in [0, 1].
    labels
        The labels the attack recovered, one per image, or None.
    reference
        What the images are scored against.
    count
        The images behind the update (the client's num-examples): the denominator of the recovered shares.
    """
    if len(images) == 0:
        empty: dict[str, Any] = {"psnr": None, "psnr_images": [], "ssim": None, "mse": None, "nearest": [],
                 **{recovered_key(db): 0.0 for db in RECOVERED_DB},
                 "scored_against": f"nearest image of {reference.name}"}
        return empty, reference.images(torch.zeros(0, dtype=torch.long))
    index, error = nearest(images, reference)
    matched = reference.images(index)
    per_image = [metrics.psnr(r, t) for r, t in zip(images.float().cpu(), matched)]
    row = {
        "psnr": float(np.mean(per_image)),
        "psnr_images": per_image,
        "ssim": float(np.mean([metrics.ssim(r, t) for r, t in zip(images.float().cpu(), matched)])),
        "mse": float(error.mean()),
        **{recovered_key(db): recovered_share(per_image, index.tolist(), count, db) for db in RECOVERED_DB},
        "nearest": index.tolist(),
        "scored_against": f"nearest image of {reference.name}",
        "true_labels": reference.labels[index].tolist(),
    }
    if labels is not None and len(labels) == len(images) and bool((reference.labels >= 0).all()):
        row["label_share"] = float((labels.cpu() == reference.labels[index]).float().mean())
    return row, matched


def recovered_share(psnr_images: list[float], nearest_images: list[int], count: int, db: float) -> float:
    """The share of `count` images some reconstruction reaches at >= `db` dB, each reference image once (any
    threshold: the audit's report adds 20 dB to the rows' 30 and 40)."""
    best: dict[int, float] = {}
    for found, value in zip(nearest_images, psnr_images):
        best[found] = max(value, best.get(found, -np.inf))
    return min(1.0, sum(value >= db for value in best.values()) / max(count, 1))
