"""Scores of a reconstruction against the truth, on [0, 1] pixels. Outside the engine by design.

For a batch the reconstructions come in no particular order, so they are first matched one-to-one
to the true images (Hungarian assignment on PSNR, as breaching and the IG paper do) and then scored.
"""
from collections import Counter

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from fl_sim.results.summary import RECOVERED_DB, recovered_key

# The pixel standard deviation of FEMNIST, as Dimitrov et al.'s code normalises it (fedavg_leakage,
# datasets/common.py): white pages with thin strokes, mean 0.964
FEMNIST_PIXEL_STD = 0.15767843198426892
SSIM_SIGMA = 1.5  # the Gaussian window of Wang et al. (2004), as IG and breaching report SSIM
SSIM_WINDOW = 11  # scikit-image's taps for that sigma


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> float:
    """Peak signal-to-noise ratio for images in [0, 1]; identical images give `max_db`."""
    error = mse(a, b)
    return max_db if error <= 10 ** (-max_db / 10) else float(-10 * np.log10(error))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity of two (C, H, W) images in [0, 1], as the papers report it (Wang et al. 2004):
    an 11-tap Gaussian window of sigma 1.5, population statistics, the mean over channels.

    Images under 11 pixels a side (tests only) keep the Gaussian weights on the largest odd window that fits.
    """
    a_np = a.detach().double().cpu().numpy()
    b_np = b.detach().double().cpu().numpy()
    side = min(a_np.shape[-1], a_np.shape[-2])
    window = None if side >= SSIM_WINDOW else side - 1 + side % 2
    return float(structural_similarity(a_np, b_np, data_range=1.0, channel_axis=0, gaussian_weights=True,
                                       sigma=SSIM_SIGMA, use_sample_covariance=False, win_size=window))


def contrast_matched_db(threshold_db: float, data_std: float, reference_std: float = FEMNIST_PIXEL_STD) -> float:
    """A PSNR threshold set on one data set, carried to another of pixel standard deviation `data_std`.

    PSNR divides the error by the fixed peak (1), not by the image's own contrast, so the same relative error
    reads 20 log10(data_std / reference_std) dB lower on images of more contrast: a grey guess at the data's
    mean scores 10 log10(1 / std^2), 16.0 dB on FEMNIST and 10.2 dB on MNIST. The threshold that asks the
    same of a reconstruction (error the same share of the image's variance) is therefore lowered by that
    much: Dimitrov et al.'s 20 dB on FEMNIST is 14.1 dB on MNIST (std 0.31).
    """
    if not (data_std > 0 and reference_std > 0):
        raise ValueError(f"pixel standard deviations must be positive, got {data_std} and {reference_std}")
    return threshold_db - 20 * float(np.log10(data_std / reference_std))


def match(reconstructions: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """order[i] = the reconstruction matched to truth[i], maximising the total PSNR."""
    scores = np.array([[psnr(r, t) for r in reconstructions] for t in truth])
    rows, cols = linear_sum_assignment(-scores)
    order = np.empty(len(truth), dtype=np.int64)
    order[rows] = cols
    return order


def label_multiset_correct(predicted, truth) -> bool:
    return Counter(np.asarray(predicted).tolist()) == Counter(np.asarray(truth).tolist())


def label_share(predicted, truth) -> float:
    """Share of the true labels recovered, ignoring order: the multisets' overlap over the batch size."""
    truth = Counter(np.asarray(truth).tolist())
    overlap = sum((Counter(np.asarray(predicted).tolist()) & truth).values())
    return overlap / max(1, sum(truth.values()))


def score(images: torch.Tensor, labels: torch.Tensor, true_images: torch.Tensor, true_labels: torch.Tensor) -> dict:
    """Per-victim scores after optimal matching: means over its images, per-image PSNRs (matched order),
    and the share of its images recovered at each threshold of RECOVERED_DB."""
    order = match(images, true_images)
    matched = images[order]
    per_image = [psnr(r, t) for r, t in zip(matched, true_images)]
    exact = float(label_multiset_correct(labels, true_labels))
    return {
        "psnr": float(np.mean(per_image)),
        "psnr_images": per_image,
        "ssim": float(np.mean([ssim(r, t) for r, t in zip(matched, true_images)])),
        "mse": float(np.mean([mse(r, t) for r, t in zip(matched, true_images)])),
        **{recovered_key(db): float(np.mean([value >= db for value in per_image])) for db in RECOVERED_DB},
        "label_share": label_share(labels, true_labels),
        "label_exact": exact,
        "label_acc": exact,  # the old name of label_exact, kept for existing readers
        "order": order.tolist(),
    }
