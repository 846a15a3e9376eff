import math

import numpy as np
import pytest
import torch

from genie.eval.metrics import PSNR_CAP, action_consistency, action_mapping, psnr, ssim


def test_psnr_hand_computed():
    a = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    b = torch.full((1, 4, 4, 3), 51, dtype=torch.uint8)  # error 0.2 everywhere -> mse 0.04
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)
    half = a.clone()
    half[..., :2, :, :] = 255  # half the pixels off by 1.0 -> mse 0.5
    assert psnr(a, half).item() == pytest.approx(10 * math.log10(2), abs=1e-4)


def test_psnr_identical_frames_is_capped_not_infinite():
    a = torch.randint(0, 256, (2, 3, 8, 8, 3), dtype=torch.uint8)
    out = psnr(a, a)
    assert out.shape == (2, 3) and torch.all(out == PSNR_CAP)


def test_ssim_identical_is_one_and_constant_images_match_formula():
    a = torch.rand(2, 16, 16, 3)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    # Constant images: variances are 0, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    x, y = torch.full((1, 16, 16, 3), 0.2), torch.full((1, 16, 16, 3), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-4)


def test_ssim_drops_with_noise():
    a = torch.rand(1, 32, 32, 3)
    noisy = (a + 0.2 * torch.randn_like(a)).clamp(0, 1)
    assert ssim(a, noisy).item() < 0.9
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:, :16])


def test_action_consistency_perfect_permutation():
    true = np.array([0, 1, 2, 3, 4] * 20)
    latent = (true + 2) % 5  # a relabelling: perfectly consistent
    r = action_consistency(latent, true, num_latent=8, num_true=5)
    assert r["nmi"] == pytest.approx(1.0)
    assert r["one_to_one_accuracy"] == pytest.approx(1.0) and r["many_to_one_accuracy"] == pytest.approx(1.0)
    assert r["latent_usage"] == pytest.approx(5 / 8) and r["majority_baseline"] == pytest.approx(0.2)


def test_action_consistency_hand_computed_mixture():
    # latent 0 -> true {0,0,0,1}; latent 1 -> true {1,1,1,1}
    latent = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    true = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    r = action_consistency(latent, true, 2, 2)
    assert r["one_to_one_accuracy"] == pytest.approx(7 / 8)
    assert r["many_to_one_accuracy"] == pytest.approx(7 / 8)
    p = np.array([[3, 1], [0, 4]]) / 8
    pl, pt = p.sum(1), p.sum(0)
    mi = sum(p[i, j] * math.log(p[i, j] / (pl[i] * pt[j])) for i in range(2) for j in range(2) if p[i, j] > 0)
    h = lambda q: -sum(v * math.log(v) for v in q if v > 0)  # noqa: E731
    assert r["nmi"] == pytest.approx(2 * mi / (h(pl) + h(pt)))


def test_action_consistency_independent_is_low():
    rng = np.random.default_rng(0)
    r = action_consistency(rng.integers(0, 8, 20000), rng.integers(0, 5, 20000), 8, 5)
    assert r["nmi"] < 0.01 and r["one_to_one_accuracy"] < 0.25


def test_action_consistency_rejects_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        action_consistency(np.array([0, 9]), np.array([0, 1]), 8, 5)
    with pytest.raises(ValueError, match="equal, non-empty"):
        action_consistency(np.array([0]), np.array([0, 1]), 8, 5)


def test_action_mapping_on_a_hand_made_pairing():
    # latent 0 -> true [0, 0, 1]; latent 1 -> [1, 1]; latent 2 -> [1, 1, 1, 2]; latent 3 never occurs.
    latent = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    true = np.array([0, 0, 1, 1, 1, 1, 1, 1, 2])
    m = action_mapping(latent, true, num_latent=4, num_true=3, true_names=["LEFT", "RIGHT"])
    assert m["true_names"] == ["LEFT", "RIGHT", "true 2"]  # names the dataset lacks fall back to "true N"
    assert m["transitions"] == 9 and m["true_frequency"] == pytest.approx([2 / 9, 6 / 9, 1 / 9])
    l0, l1, l2, l3 = m["latents"]
    assert (l0["majority_name"], l0["count"], l0["counts"]) == ("LEFT", 3, [2, 1, 0])
    assert l0["purity"] == pytest.approx(2 / 3) and l0["lift"] == pytest.approx((2 / 3) / (2 / 9))
    assert l0["distribution"] == pytest.approx([2 / 3, 1 / 3, 0])
    assert (l1["majority"], l1["purity"], l1["lift"]) == (1, 1.0, pytest.approx(1.5))
    assert (l2["majority_name"], l2["purity"]) == ("RIGHT", 0.75)
    assert l3["count"] == 0 and l3["majority"] is None and l3["purity"] is None
    # Many-to-one: 0 -> LEFT, 1 -> RIGHT, 2 -> RIGHT: 2 + 2 + 3 of 9. One-to-one can use RIGHT once: 2 + 3 + 0 = 5.
    assert m["many_to_one_accuracy"] == pytest.approx(7 / 9)
    assert m["one_to_one_accuracy"] == pytest.approx(5 / 9)
    assert m["one_to_one_accuracy"] == pytest.approx(action_consistency(latent, true, 4, 3)["one_to_one_accuracy"])
    assert m["one_to_one"][0] == "LEFT" and len(set(n for n in m["one_to_one"] if n)) == 3


def test_action_mapping_validates():
    with pytest.raises(ValueError, match="out of range"):
        action_mapping(np.array([0, 5]), np.array([0, 1]), 4, 2)
    with pytest.raises(ValueError, match="non-empty"):
        action_mapping(np.array([], dtype=int), np.array([], dtype=int), 4, 2)
