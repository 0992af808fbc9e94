"""β-DPO: `dynamic_beta` (Wu et al. 2024, Eqs. 6–7) and the running margin statistics."""
import math

import pytest
import torch

from losses import MarginStats, dynamic_beta, preference_loss


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_a_zero_and_rho_zero_is_plain_dpo():
    """a = 0 gives β_used = β0; ρ = 0 keeps all pairs, so β-DPO reduces to DPO."""
    margins = torch.tensor([0.5, -1.0, 3.0, 2.0])
    beta_used, keep = dynamic_beta(margins, 0.2, 1.0, beta=0.1, a=0.0, mode_weight=0.0, generator=gen())
    assert beta_used.item() == pytest.approx(0.1)
    assert beta_used.dim() == 0 and not beta_used.requires_grad
    assert keep.tolist() == [True, True, True, True]


def test_beta_used_worked_by_hand():
    """ρ = 0 keeps m = [1, 2, 3, 6] (mean 3); μ = 1, β0 = 0.1, α = 0.5:
    β = 0.1·(1 + 0.5·(3 − 1)) = 0.2."""
    beta_used, keep = dynamic_beta(torch.tensor([1.0, 2.0, 3.0, 6.0]), 1.0, 2.0, beta=0.1, a=0.5, mode_weight=0.0)
    assert beta_used.item() == pytest.approx(0.2)
    assert keep.all()


def test_beta_is_clamped_at_1e_minus_3():
    """m = [−10], μ = 0, α = 1: 0.1·(1 − 10) = −0.9 would flip the loss; it is clamped to 1e-3."""
    beta_used, _ = dynamic_beta(torch.tensor([-10.0]), 0.0, 1.0, beta=0.1, a=1.0, mode_weight=0.0)
    assert beta_used.item() == pytest.approx(1e-3)


@pytest.mark.parametrize('n, rho, k', [(10, 0.2, 8), (7, 0.2, 5), (64, 0.2, 51), (1, 0.5, 1), (3, 0.9, 1)])
def test_kept_count_is_max_one_floor_n_times_one_minus_rho(n, rho, k):
    """k = max(1, ⌊N·(1 − ρ)⌋): 10·0.8 = 8, ⌊7·0.8⌋ = ⌊5.6⌋ = 5, ⌊64·0.8⌋ = 51, N = 1 keeps 1, ⌊0.3⌋ → 1."""
    margins = torch.randn(n, generator=gen(n))
    _, keep = dynamic_beta(margins, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=rho, generator=gen())
    assert keep.dtype == torch.bool and keep.shape == (n,)
    assert int(keep.sum()) == k


def test_beta_follows_the_mean_of_the_kept_margins():
    """With ρ = 0.5 on m = [0, 0, 10, 10] and a tiny σ, the 10s weigh exp(−½·10⁸) = 0: the filter keeps
    the two 0s, whose mean equals μ = 0, so β_used = β0 exactly."""
    beta_used, keep = dynamic_beta(torch.tensor([0.0, 0.0, 10.0, 10.0]), 0.0, 1e-3, beta=0.1, a=0.6,
                                   mode_weight=0.5, generator=gen())
    assert keep.tolist() == [True, True, False, False]
    assert beta_used.item() == pytest.approx(0.1)


def test_identical_generator_seeds_give_identical_results():
    """The draw is the generator's alone: for each seed, the kept set is exactly torch.multinomial's k = ⌊32·0.8⌋ = 25
    indices without replacement from that seed, with Eq. 7's weights exp(−½((m − 0.1)/0.8)²), and β is
    0.1·(1 + 0.6·(mean of those 25 margins − 0.1)); the same seed twice gives the same result."""
    margins = torch.randn(32, generator=gen(3))
    weights = torch.exp(-0.5 * ((margins - 0.1) / 0.8) ** 2)
    for seed in (7, 8):
        beta_used, keep = dynamic_beta(margins, 0.1, 0.8, beta=0.1, a=0.6, mode_weight=0.2, generator=gen(seed))
        again = dynamic_beta(margins, 0.1, 0.8, beta=0.1, a=0.6, mode_weight=0.2, generator=gen(seed))
        assert torch.equal(beta_used, again[0]) and torch.equal(keep, again[1])
        drawn = torch.multinomial(weights, 25, replacement=False, generator=gen(seed))
        assert keep.nonzero().squeeze(1).tolist() == sorted(drawn.tolist())
        assert beta_used.item() == pytest.approx(0.1 * (1 + 0.6 * (margins[drawn].mean().item() - 0.1)), rel=1e-6)


def test_outlier_is_kept_far_less_often_than_a_central_pair():
    """Nine margins at μ (weight 1) and one at μ + 4σ (weight exp(−8) = 3.4e-4); k = 8 of 10.
    A central pair is kept with probability ≈ 8/9 = 0.89; the outlier almost never."""
    margins = torch.tensor([0.0] * 9 + [4.0])
    g = gen(0)
    kept = torch.zeros(10)
    draws = 400
    for _ in range(draws):
        kept += dynamic_beta(margins, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.2, generator=g)[1].float()
    central, outlier = kept[:9].mean().item() / draws, kept[9].item() / draws
    assert central == pytest.approx(8 / 9, abs=0.01)
    assert outlier < 0.02
    assert central > 40 * max(outlier, 1 / draws)


@pytest.mark.parametrize('case, margins, mu, sigma', [
    ('first step: sigma = 0 and every margin 0', torch.zeros(8), 0.0, 0.0),
    ('sigma = 0 with spread margins', torch.arange(8.0), 0.0, 0.0),
    ('sigma is NaN', torch.arange(8.0), 0.0, float('nan')),
    ('sigma is inf', torch.arange(8.0), 0.0, float('inf')),
    ('mu is NaN', torch.arange(8.0), float('nan'), 1.0),
    ('all weights underflow to 0', torch.full((8,), 1000.0), 0.0, 1.0),
    ('a margin is inf', torch.tensor([0.0, 1.0, float('inf'), 2.0, -1.0, 0.5, 0.2, 0.3]), 0.0, 1.0),
    ('N = 1', torch.tensor([0.7]), 0.0, 0.0),
])
def test_degenerate_cases_are_finite(case, margins, mu, sigma):
    beta_used, keep = dynamic_beta(margins, mu, sigma, beta=0.1, a=0.6, mode_weight=0.2, generator=gen())
    assert math.isfinite(beta_used.item()) and beta_used.item() >= 1e-3, case
    assert int(keep.sum()) == max(1, int(margins.numel() * 0.8)), case


def test_fewer_nonzero_weights_than_k_keeps_those_then_fills_uniformly():
    """3 central margins (weight 1) and 7 at 100σ (weight 0); k = 8: the 3 central pairs are always
    kept and 5 of the 7 others are drawn uniformly, so each of those is kept 5/7 = 0.71 of the time."""
    margins = torch.tensor([0.0, 0.1, -0.1] + [100.0] * 7)
    g = gen(0)
    kept = torch.zeros(10)
    for _ in range(300):
        keep = dynamic_beta(margins, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.2, generator=g)[1]
        assert keep[:3].all() and int(keep.sum()) == 8
        kept += keep.float()
    assert (kept[3:] / 300).mean().item() == pytest.approx(5 / 7, abs=1e-6)  # exactly 5 of 7 each draw
    assert (kept[3:] / 300).min().item() > 0.55  # and spread over all of them


def test_mask_and_beta_live_on_the_margins_device_and_ignore_global_rng():
    """Only the passed generator is used: reseeding the global RNG does not change the draw."""
    margins = torch.randn(16, generator=gen(5))
    torch.manual_seed(0)
    a = dynamic_beta(margins, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.25, generator=gen(1))
    torch.manual_seed(123)
    b = dynamic_beta(margins, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.25, generator=gen(1))
    assert torch.equal(a[1], b[1]) and a[1].device == margins.device


def test_dynamic_beta_applies_on_top_of_ipo_and_conservative_dpo():
    """The β from dynamic_beta feeds any loss: IPO with β = 0.25 and h = 2 gives (2 − 2)² = 0."""
    beta_used, _ = dynamic_beta(torch.tensor([2.0]), 2.0, 1.0, beta=0.25, a=0.6, mode_weight=0.0)
    one = torch.tensor([-1.0])
    loss = preference_loss(one, one - 2, one, one, beta=beta_used, ipo=True)[0]
    assert beta_used.item() == pytest.approx(0.25) and loss.item() == pytest.approx(0.0)
    cdpo = preference_loss(one, one - 2, one, one, beta=beta_used, label_smoothing=0.2)[0]
    assert math.isfinite(cdpo.item())


def test_margin_stats_update_by_hand():
    """Momentum 0.9, starting at 0. Batch [1, 2, 3]: mean 2, unbiased std 1 → μ = 0.2, σ = 0.1.
    Batch [3, 3, 3, 3]: mean 3, std 0 → μ = 0.9·0.2 + 0.3 = 0.48, σ = 0.9·0.1 = 0.09.
    A single margin has std 0 (torch's unbiased std would be NaN): [5] → μ = 0.932, σ = 0.081."""
    stats = MarginStats()
    assert stats.mean.item() == 0 and stats.std.item() == 0
    stats.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((0.2, 0.1))
    stats.update(torch.tensor([3.0, 3.0, 3.0, 3.0]))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((0.48, 0.09))
    stats.update(torch.tensor([5.0]))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((0.932, 0.081))


def test_margin_stats_ignore_non_finite_margins():
    stats = MarginStats()
    stats.update(torch.tensor([1.0, float('nan'), 3.0, float('inf')]))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((0.2, 0.1414214), abs=1e-6)
    stats.update(torch.tensor([float('nan')]))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((0.2, 0.1414214), abs=1e-6)


def test_margin_stats_state_dict_round_trip():
    stats = MarginStats()
    stats.update(torch.tensor([0.3, -1.7, 2.2]))
    restored = MarginStats()
    restored.load_state_dict(stats.state_dict())
    assert torch.equal(restored.mean, stats.mean) and torch.equal(restored.std, stats.std)
    assert restored.momentum == 0.9
