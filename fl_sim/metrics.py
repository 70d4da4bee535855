"""Scores of a reconstruction against the truth, on [0, 1] pixels. Outside the engine by design.

For a batch the reconstructions come in no particular order, so they are first matched one-to-one
to the true images (Hungarian assignment on PSNR, as breaching and the IG paper do) and then scored.
"""
from collections import Counter

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> float:
    """Peak signal-to-noise ratio for images in [0, 1]; identical images give `max_db`."""
    error = mse(a, b)
    return max_db if error <= 10 ** (-max_db / 10) else float(-10 * np.log10(error))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity of two (C, H, W) images in [0, 1] (scikit-image, Gaussian-free 7x7 window)."""
    a_np = a.detach().double().cpu().numpy()
    b_np = b.detach().double().cpu().numpy()
    window = min(7, a_np.shape[-1], a_np.shape[-2])
    window -= 1 - window % 2  # odd
    return float(structural_similarity(a_np, b_np, data_range=1.0, channel_axis=0, win_size=window))


def match(reconstructions: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """order[i] = the reconstruction matched to truth[i], maximising the total PSNR."""
    scores = np.array([[psnr(r, t) for r in reconstructions] for t in truth])
    rows, cols = linear_sum_assignment(-scores)
    order = np.empty(len(truth), dtype=np.int64)
    order[rows] = cols
    return order


def label_multiset_correct(predicted, truth) -> bool:
    return Counter(np.asarray(predicted).tolist()) == Counter(np.asarray(truth).tolist())


def score(images: torch.Tensor, labels: torch.Tensor, true_images: torch.Tensor, true_labels: torch.Tensor) -> dict:
    """Per-victim scores after optimal matching: means over its images, plus per-image PSNRs."""
    order = match(images, true_images)
    matched = images[order]
    per_image = [psnr(r, t) for r, t in zip(matched, true_images)]
    return {
        "psnr": float(np.mean(per_image)),
        "psnr_images": per_image,
        "ssim": float(np.mean([ssim(r, t) for r, t in zip(matched, true_images)])),
        "mse": float(np.mean([mse(r, t) for r, t in zip(matched, true_images)])),
        "label_acc": float(label_multiset_correct(labels, true_labels)),
        "order": order.tolist(),
    }
