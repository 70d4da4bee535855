import math

import numpy as np
import torch

from fl_sim import metrics


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


def test_score_matches_before_scoring_and_checks_label_multisets():
    truth = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    result = metrics.score(truth[[2, 0, 1]], torch.tensor([7, 1, 1]), truth, torch.tensor([1, 7, 1]))
    assert result["psnr"] == 100.0 and result["label_acc"] == 1.0
    assert metrics.score(truth, torch.tensor([1, 1, 1]), truth, torch.tensor([1, 7, 1]))["label_acc"] == 0.0
