import math

import numpy as np
import pytest
import torch

from attacker import Reconstruction, Status
from fl_sim.results import metrics
from fl_sim.results.evaluation import score_and_save, summarise
from fl_sim.results.rows import MetricsRow, metrics_row
from fl_sim.results.summary import NOT_ATTACKED


def test_psnr_of_a_known_error():
    a = torch.full((3, 8, 8), 0.5, dtype=torch.float64)
    assert math.isclose(metrics.psnr(a, a + 0.1), 20.0, rel_tol=1e-9)  # MSE 0.01 -> 20 dB
    assert math.isclose(metrics.mse(a, a + 0.1), 0.01, rel_tol=1e-9)
    assert metrics.psnr(a, a) == 100.0


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert math.isclose(metrics.ssim(image, image), 1.0, abs_tol=1e-9)
    noisy = (image + 0.3 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert metrics.ssim(image, noisy) < 0.9


def test_matching_undoes_a_permutation():
    truth = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    permutation = np.array([3, 0, 4, 1, 2])
    shuffled = truth[permutation] + 0.01
    order = metrics.match(shuffled, truth)
    assert torch.allclose(shuffled[order], truth + 0.01)
    assert [int(permutation[i]) for i in order] == list(range(5))


def gaussian_ssim_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 11 x 11 grey images as Wang et al. (2004) define it: one window, Gaussian weights of
    sigma 1.5 summing to 1, population (weighted) variances, K1 = 0.01, K2 = 0.03, L = 1."""
    offsets = np.arange(11) - 5
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5 ** 2))
    weights /= weights.sum()
    mean_a, mean_b = (weights * a).sum(), (weights * b).sum()
    var_a, var_b = (weights * (a - mean_a) ** 2).sum(), (weights * (b - mean_b) ** 2).sum()
    cov = (weights * (a - mean_a) * (b - mean_b)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))


def test_ssim_uses_the_papers_gaussian_window():
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(1, 11, 11, generator=generator, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(1, 11, 11, generator=generator, dtype=torch.float64)).clamp(0, 1)
    expected = gaussian_ssim_by_hand(a[0].numpy(), b[0].numpy())
    assert math.isclose(metrics.ssim(a, b), expected, rel_tol=1e-9), (metrics.ssim(a, b), expected)
    # colour: the mean of the channels' SSIMs
    c = torch.stack([a[0], b[0], a[0].flip(-1)])
    d = torch.stack([b[0], a[0], b[0].flip(-1)])
    assert math.isclose(metrics.ssim(c, d), expected, rel_tol=1e-9)


def test_score_matches_before_scoring_and_checks_label_multisets():
    truth = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    result = metrics.score(truth[[2, 0, 1]], torch.tensor([7, 1, 1]), truth, torch.tensor([1, 7, 1]))
    assert result["psnr"] == 100.0 and result["label_exact"] == result["label_acc"] == 1.0
    assert result["label_share"] == 1.0
    wrong = metrics.score(truth, torch.tensor([1, 1, 1]), truth, torch.tensor([1, 7, 1]))
    assert wrong["label_exact"] == wrong["label_acc"] == 0.0
    assert wrong["label_share"] == pytest.approx(2 / 3)  # two of the three labels (1, 1) are right


def test_recovered_shares_count_images_at_30_and_40_db_after_matching():
    truth = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    # errors of 0.009 (40.9 dB), 0.02 (34.0 dB), 0.05 (26.0 dB) and none (100 dB), handed over shuffled
    reconstructions = truth + torch.tensor([0.009, 0.02, 0.05, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    result = metrics.score(reconstructions[[3, 2, 0, 1]], torch.zeros(4), truth, torch.zeros(4))
    assert result["psnr_images"] == pytest.approx([40.9151, 33.9794, 26.0206, 100.0], abs=1e-3)
    assert result["recovered_at_30db"] == 0.75 and result["recovered_at_40db"] == 0.5


def _victim(truth: torch.Tensor, error: float | None) -> MetricsRow:
    """A metrics row as fl-sim attack writes it: a reconstruction off by `error`, or a failed attack."""
    labels = torch.arange(len(truth))
    if error is None:
        result = Reconstruction(torch.empty(0), torch.empty(0, dtype=torch.long), float("inf"), Status.DIVERGED)
    else:
        result = Reconstruction((truth + error).clamp(0, 1), labels, 0.1)
    return metrics_row(**score_and_save(result, truth, labels, folder=None))


def test_failed_victims_count_as_0_db_and_nothing_recovered():
    truth = torch.tensor([0.2, 0.6], dtype=torch.float64).view(2, 1, 1, 1).expand(2, 1, 8, 8)
    rows = [_victim(truth, 0.001), _victim(truth, None), _victim(truth, 0.02), _victim(truth, None)]  # 60, -, 34, -
    assert rows[1].recovered_at_30db == 0.0 and rows[1].label_share == 0.0 and rows[1].psnr is None
    assert rows[0].recovered_at_40db == 1.0 and rows[2].recovered_at_40db == 0.0

    summary = summarise(rows)
    assert summary["victims"] == 4 and summary["failed"] == 2 and summary["images"] == 8
    assert summary["psnr_median"] == pytest.approx((0 + 33.9794) / 2, abs=1e-3)  # 0, 0, 34, 60 dB
    assert summary["psnr_min"] == 0.0 and summary["psnr_max"] == pytest.approx(60.0)
    assert summary["recovered_at_30db"] == 0.5 and summary["recovered_at_40db"] == 0.25  # 4 and 2 of 8 images
    assert summary["label_share"] == 0.5 and summary["label_exact"] == summary["label_acc"] == 0.5

    # a client left out before the attack (rejected reply) is no victim
    left_out = metrics_row(sorted(NOT_ATTACKED)[0])
    with_left_out = summarise(rows + [left_out])
    assert with_left_out["left_out"] == 1 and summary["left_out"] == 0
    assert {**with_left_out, "left_out": 0} == summary
    assert summarise([])["psnr_median"] is None and summarise([])["failed"] == 0


def test_contrast_matched_threshold_asks_the_same_share_of_the_variance():
    reference = metrics.FEMNIST_PIXEL_STD
    assert metrics.contrast_matched_db(20.0, reference) == pytest.approx(20.0)
    # a guess at the mean has error = variance: it sits as far below the carried threshold on either data set
    for std in (0.1, 0.31, 0.5):
        guess_db = -10 * np.log10(std ** 2)
        reference_guess_db = -10 * np.log10(reference ** 2)
        assert metrics.contrast_matched_db(20.0, std) - guess_db == pytest.approx(20.0 - reference_guess_db)
    assert metrics.contrast_matched_db(20.0, 0.3106) == pytest.approx(14.11, abs=0.01)  # MNIST
    with pytest.raises(ValueError, match="positive"):
        metrics.contrast_matched_db(20.0, 0.0)
