"""The research switches of config/loss/{dpo,ipo}.yaml: β-DPO's ablations and dynamic β on more losses.

Each switch reduces to the default where it should, has a worked-number test, and a bad value is refused
before anything is written. The defaults give the original's numbers (tests/test_beta_dpo.py,
tests/test_losses.py).
"""
import math
import os

import pytest
import torch

from helpers import FAST, compose_config
from losses import (MarginStats, beta_bounds, chosen_nll, dynamic_beta, filter_weights, instance_betas, keep_mask,
                    preference_loss)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def logps(*values):
    return torch.tensor(values, dtype=torch.float32)


# ----- loss.beta_level -------------------------------------------------------------------------------

def test_instance_beta_with_all_margins_equal_is_the_batch_beta():
    """m = [2, 2, 2, 2], M0 = 1, β0 = 0.1, α = 0.5: batch β = 0.1·(1 + 0.5·(2 − 1)) = 0.15, and every β_i too."""
    margins = torch.full((4,), 2.0)
    batch_beta, keep = dynamic_beta(margins, 1.0, 1.0, beta=0.1, a=0.5, mode_weight=0.0)
    betas = instance_betas(margins, 1.0, beta=0.1, a=0.5)
    assert batch_beta.item() == pytest.approx(0.15)
    assert betas.shape == (4,) and not betas.requires_grad
    torch.testing.assert_close(betas, batch_beta.expand(4))


def test_instance_betas_worked_by_hand_and_clamped_like_the_batch_beta():
    """m = [−1, 1, 3], M0 = 1, β0 = 0.1, α = 0.5: β_i = 0.1·(1 + 0.5·(m_i − 1)) = [0, 0.1, 0.2].
    The 0 is clamped to the floor 1e-3; with beta_range [0.5, 2] (IPO's) to 0.05, and 0.2 = 2·β0 stays."""
    margins = logps(-1, 1, 3)
    torch.testing.assert_close(instance_betas(margins, 1.0, beta=0.1, a=0.5), logps(1e-3, 0.1, 0.2))
    torch.testing.assert_close(instance_betas(margins, 1.0, beta=0.1, a=0.5, beta_range=(0.5, 2.0)),
                               logps(0.05, 0.1, 0.2))
    # α = 0: β0 for every pair, whatever the margins
    torch.testing.assert_close(instance_betas(logps(-7, 0, 9), 1.0, beta=0.1, a=0.0), logps(0.1, 0.1, 0.1))
    # a non-finite margin gets β0
    assert instance_betas(logps(float('nan'), 3), 1.0, beta=0.1, a=0.5).tolist() == pytest.approx([0.1, 0.2])


def test_per_pair_beta_enters_the_loss_pair_by_pair():
    """β = [0.5, 1] with h = 2 for both pairs: −log σ(1) = 0.313262 and −log σ(2) = 0.126928; rewards use each β."""
    losses, chosen, rejected = preference_loss(logps(-1, -1), logps(-3, -3), logps(-2, -2), logps(-2, -2),
                                               beta=logps(0.5, 1.0))
    assert losses.tolist() == pytest.approx([0.3132617, 0.1269280], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 1.0]) and rejected.tolist() == pytest.approx([-0.5, -1.0])


# ----- loss.filter -----------------------------------------------------------------------------------

def test_filter_weights_worked_by_hand():
    """m = [−2, −1, 0, 1, 2], M0 = 0, σ = 1, so z = m: gaussian exp(−z²/2) = [0.135335, 0.606531, 1, 0.606531,
    0.135335]; tail weighs only z < 0, head only z > 0; none weighs every pair 1."""
    m = logps(-2, -1, 0, 1, 2)
    e2, e05 = math.exp(-2), math.exp(-0.5)
    assert filter_weights(m, 0.0, 1.0, 'gaussian').tolist() == pytest.approx([e2, e05, 1, e05, e2])
    assert filter_weights(m, 0.0, 1.0, 'tail').tolist() == pytest.approx([e2, e05, 1, 1, 1])
    assert filter_weights(m, 0.0, 1.0, 'head').tolist() == pytest.approx([1, 1, 1, e05, e2])
    assert filter_weights(m, 0.0, 1.0, 'none').tolist() == [1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="filter='middle' is not one of gaussian, tail, head, none"):
        filter_weights(m, 0.0, 1.0, 'middle')


@pytest.mark.parametrize('filter, kept, beta', [
    ('tail', [False, True, True, True], 0.15),   # kept mean (0 + 0 + 10)/3: 0.1·(1 + 0.15·10/3) = 0.15
    ('head', [True, True, True, False], 0.05),   # kept mean (−10 + 0 + 0)/3: 0.1·(1 − 0.15·10/3) = 0.05
])
def test_one_sided_filters_worked_by_hand(filter, kept, beta):
    """m = [−10, 0, 0, 10], M0 = 0, σ = 0.1 (z = ±100: weight exp(−5000) = 0), ρ = 0.25 so k = 3 of 4 are kept,
    β0 = 0.1, α = 0.15. The tail filter drops −10, the head filter drops 10; every draw alike."""
    for seed in range(5):
        beta_used, keep = dynamic_beta(logps(-10, 0, 0, 10), 0.0, 0.1, beta=0.1, a=0.15, mode_weight=0.25,
                                       generator=gen(seed), filter=filter)
        assert keep.tolist() == kept
        assert beta_used.item() == pytest.approx(beta)


def test_gaussian_filter_drops_one_of_the_two_ends():
    """The same batch with the paper's filter: both ends weigh 0, so the two 0s are kept and the third kept pair is
    one of the ends, drawn uniformly (`_keep_indices`): over 200 draws each end is kept about half the time."""
    kept_low = 0
    g = gen(0)
    for _ in range(200):
        _, keep = dynamic_beta(logps(-10, 0, 0, 10), 0.0, 0.1, beta=0.1, a=0.15, mode_weight=0.25, generator=g)
        assert keep[1] and keep[2] and int(keep.sum()) == 3
        kept_low += int(keep[0])
    assert 70 < kept_low < 130


def test_filter_none_keeps_every_pair_and_equals_rho_zero():
    """filter=none keeps all pairs whatever ρ (no draw), so β and the mask equal those of ρ = 0:
    m = [1, 2, 3, 6], μ = 1, β0 = 0.1, α = 0.5: β = 0.1·(1 + 0.5·(3 − 1)) = 0.2."""
    margins = logps(1, 2, 3, 6)
    none = dynamic_beta(margins, 1.0, 2.0, beta=0.1, a=0.5, mode_weight=0.5, generator=gen(), filter='none')
    rho_zero = dynamic_beta(margins, 1.0, 2.0, beta=0.1, a=0.5, mode_weight=0.0)
    assert none[1].all() and torch.equal(none[1], rho_zero[1])
    assert none[0].item() == rho_zero[0].item() == pytest.approx(0.2)
    assert keep_mask(margins, 1.0, 2.0, 0.9, 'none').all()


def test_one_sided_filter_mostly_drops_its_own_side():
    """Nine margins at μ and one at μ − 3σ (tail weight exp(−4.5) = 0.011); ρ = 0.1 drops one of ten.
    The tail filter drops the low pair in nearly every draw; the head filter weighs it 1 like the rest,
    so it drops it in about 1 draw of 10."""
    margins = logps(-3, *[0] * 9)
    counts = {}
    for name in ('tail', 'head'):
        g = gen(1)
        counts[name] = sum(not keep_mask(margins, 0.0, 1.0, 0.1, name, g)[0] for _ in range(300))
    assert counts['tail'] > 280
    assert 10 < counts['head'] < 60


# ----- loss.m0 and loss.momentum ---------------------------------------------------------------------

def test_momentum_one_keeps_the_threshold_constant_like_a_fixed_m0():
    """γ = 1: the running statistics never move, μ = σ = 0 after any batches, so M0 = 0 throughout — the same
    β and masks as a fixed m0 = 0 (with γ = 1 for σ too)."""
    running, fixed = MarginStats(momentum=1.0), MarginStats(momentum=1.0, m0=0.0)
    g_running, g_fixed = gen(3), gen(3)
    for step in range(4):
        margins = torch.randn(8, generator=gen(step)) + step
        running.update(margins)
        fixed.update(margins)
        assert running.threshold.item() == fixed.threshold.item() == 0.0
        a = dynamic_beta(margins, running.threshold, running.std, beta=0.1, a=0.6, mode_weight=0.2, generator=g_running)
        b = dynamic_beta(margins, fixed.threshold, fixed.std, beta=0.1, a=0.6, mode_weight=0.2, generator=g_fixed)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fixed_m0_worked_by_hand():
    """m0 = 2 stays the threshold while μ runs: after [1, 2, 3] μ = 0.2, but M0 = 2. Kept m = [1, 3, 5]
    (mean 3), β0 = 0.1, α = 0.5: β = 0.1·(1 + 0.5·(3 − 2)) = 0.15 (with μ it would be 0.1·(1 + 0.5·2.8) = 0.24)."""
    stats = MarginStats(m0=2.0)
    stats.update(logps(1, 2, 3))
    assert stats.mean.item() == pytest.approx(0.2) and stats.threshold.item() == 2.0
    beta_used, _ = dynamic_beta(logps(1, 3, 5), stats.threshold, stats.std, beta=0.1, a=0.5, mode_weight=0.0)
    assert beta_used.item() == pytest.approx(0.15)
    beta_running, _ = dynamic_beta(logps(1, 3, 5), stats.mean, stats.std, beta=0.1, a=0.5, mode_weight=0.0)
    assert beta_running.item() == pytest.approx(0.24)


def test_momentum_worked_by_hand_and_state_round_trip():
    """γ = 0.5, batch [1, 2, 3] (mean 2, std 1): μ = 0.5·0 + 0.5·2 = 1, σ = 0.5. The state carries γ; m0 is a
    setting of the statistics (from the config), kept through a load."""
    stats = MarginStats(momentum=0.5, m0=1.5)
    stats.update(logps(1, 2, 3))
    assert (stats.mean.item(), stats.std.item()) == pytest.approx((1.0, 0.5))
    restored = MarginStats(m0=1.5)
    restored.load_state_dict(stats.state_dict())
    assert (restored.momentum, restored.mean.item(), restored.threshold.item()) == (0.5, 1.0, 1.5)


# ----- loss.loss_type, loss.rpo_alpha, loss.average_log_prob -----------------------------------------

def test_hinge_loss_worked_values_and_gradient():
    """SLiC's hinge max(0, 1 − β·h), h = 2: β = 0.25 gives 0.5, β = 1 gives 0 (past the margin, no gradient).
    d/dπ_c = −β = −0.25 while inside the margin."""
    pc = logps(-1).requires_grad_()
    losses, _, _ = preference_loss(pc, logps(-3), logps(-2), logps(-2), beta=0.25, loss_type='hinge')
    assert losses.item() == pytest.approx(0.5)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.25)
    assert preference_loss(logps(-1), logps(-3), logps(-2), logps(-2), beta=1.0, loss_type='hinge')[0].item() == 0


def test_loss_type_defaults_and_aliases():
    """loss_type='sigmoid' is the default DPO loss; loss_type='ipo' is ipo=True; an unknown type is refused."""
    g = gen(0)
    x = [torch.randn(6, generator=g) for _ in range(4)]
    for a, b in zip(preference_loss(*x, beta=0.3), preference_loss(*x, beta=0.3, loss_type='sigmoid')):
        assert torch.equal(a, b)
    for a, b in zip(preference_loss(*x, beta=0.3, ipo=True), preference_loss(*x, beta=0.3, loss_type='ipo')):
        assert torch.equal(a, b)
    for unknown in ('orpo', 'kto'):  # kto: a registered objective, but not of a pair's margin
        with pytest.raises(ValueError, match=f"loss_type='{unknown}' is not one of sigmoid, hinge, ipo, simpo$"):
            preference_loss(*x, beta=0.3, loss_type=unknown)


def test_chosen_nll_worked_by_hand():
    """RPO's term −log π(y_w)/|y_w|: summed log-probs [−6, −1.5] over [3, 1] tokens give [2, 1.5]; a response
    without labelled tokens (sum 0, count 0) gives 0. With α_RPO = 0.5 and policy = reference the pair loss is
    ln 2 + 0.5·2 = 1.693147."""
    assert chosen_nll(logps(-6, -1.5, 0), torch.tensor([3, 1, 0])).tolist() == pytest.approx([2, 1.5, 0])
    p = logps(-6)
    dpo = preference_loss(p, p - 1, p, p - 1, beta=0.1)[0]
    total = dpo + 0.5 * chosen_nll(p, torch.tensor([3]))
    assert total.item() == pytest.approx(math.log(2) + 1.0, abs=1e-6)


def test_length_normalised_logps_change_the_margin_scale():
    """average_log_prob scores each response by its mean token log-prob: a 4-token chosen response with sum −8
    (mean −2) against a 1-token rejected one with sum −3 (mean −3), reference-free, β = 1:
    summed h = −8 − (−3) = −5, loss −log σ(−5) = 5.006715; averaged h = −2 − (−3) = 1, loss −log σ(1) = 0.313262."""
    ref = logps(0)
    summed = preference_loss(logps(-8), logps(-3), ref, ref, beta=1.0, reference_free=True)[0]
    averaged = preference_loss(logps(-8 / 4), logps(-3 / 1), ref, ref, beta=1.0, reference_free=True)[0]
    assert summed.item() == pytest.approx(5.0067153, abs=1e-5)
    assert averaged.item() == pytest.approx(0.3132617, abs=1e-6)


@pytest.mark.parametrize('loss_type', ['sigmoid', 'hinge'])
def test_dynamic_beta_feeds_the_hinge_and_sigmoid_losses(loss_type):
    """β-DPO's β from a batch of h = 2: μ = 1, α = 0.5 → β = 0.1·(1 + 0.5·1) = 0.15; sigmoid −log σ(0.3) = 0.554355,
    hinge 1 − 0.3 = 0.7."""
    beta_used, _ = dynamic_beta(torch.full((3,), 2.0), 1.0, 1.0, beta=0.1, a=0.5, mode_weight=0.0)
    losses, _, _ = preference_loss(logps(-1, -1, -1), logps(-3, -3, -3), logps(0, 0, 0), logps(0, 0, 0),
                                   beta=beta_used, loss_type=loss_type)
    expected = {'sigmoid': 0.5543552, 'hinge': 0.7}[loss_type]
    assert losses.tolist() == pytest.approx([expected] * 3, abs=1e-6)


# ----- IPO with a bounded dynamic β ------------------------------------------------------------------

def test_beta_bounds_worked_by_hand():
    """DPO's default [0, null]: [1e-3, ∞) (the reference clamp); IPO's [0.5, 2] at β0 = 0.1: [0.05, 0.2]."""
    assert beta_bounds(0.1) == (1e-3, math.inf)
    assert beta_bounds(0.1, (0.5, 2.0)) == pytest.approx((0.05, 0.2))


def test_ipo_with_beta_dpo_stays_finite_and_bounded_on_very_negative_margins():
    """A batch of 8 pairs with h = −50 (μ = 0, σ = 1), β0 = 0.1, α = 0.6: unbounded β = 0.1·(1 − 30) → 1e-3,
    IPO's target 1/(2β) = 500, loss (−550)² = 302500 and dL/dh = −1100 per pair. With IPO's beta_range [0.5, 2]
    β = 0.05, target 10, loss (−60)² = 3600 and dL/dh = −120 = −2(|h| + 1/β0), the most the bound allows.
    On very positive margins (h = +50) β stops at 2β0 = 0.2: target 2.5, loss 47.5² = 2256.25."""
    h = torch.full((8,), -50.0)
    unbounded, _ = dynamic_beta(h, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.2, generator=gen())
    bounded, keep = dynamic_beta(h, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.2, generator=gen(), beta_range=(0.5, 2.0))
    assert unbounded.item() == pytest.approx(1e-3) and bounded.item() == pytest.approx(0.05)

    pc = torch.zeros(8, requires_grad=True)
    zero = torch.zeros(8)
    losses, _, _ = preference_loss(pc, zero + 50, zero, zero, beta=bounded, loss_type='ipo')  # h = −50
    assert torch.isfinite(losses).all() and losses.tolist() == pytest.approx([3600.0] * 8)
    (losses * keep).sum().backward()
    assert pc.grad[keep].tolist() == pytest.approx([-120.0] * int(keep.sum()))
    assert pc.grad.abs().max().item() <= 2 * (50 + 1 / 0.1) + 1e-4
    wild = preference_loss(zero, zero + 50, zero, zero, beta=unbounded, loss_type='ipo')[0]
    assert wild[0].item() == pytest.approx(302500.0, rel=1e-4)

    high, _ = dynamic_beta(-h, 0.0, 1.0, beta=0.1, a=0.6, mode_weight=0.2, generator=gen(), beta_range=(0.5, 2.0))
    assert high.item() == pytest.approx(0.2)
    assert preference_loss(zero + 50, zero, zero, zero, beta=high, loss_type='ipo')[0][0].item() == pytest.approx(2256.25)


def test_ipo_instance_betas_are_bounded_too():
    """Instance-level IPO on margins [−50, 0, 50] (M0 = 0, β0 = 0.1, α = 0.6): [0.05, 0.1, 0.2], every target
    1/(2β_i) in [2.5, 10]."""
    betas = instance_betas(logps(-50, 0, 50), 0.0, beta=0.1, a=0.6, beta_range=(0.5, 2.0))
    assert betas.tolist() == pytest.approx([0.05, 0.1, 0.2])


# ----- the config: defaults, composition, validation -------------------------------------------------

def test_defaults_compose_and_are_the_originals(tmp_path):
    """loss=dpo composes with every switch at the original's behaviour; loss=ipo bounds β to [0.5, 2]·β0."""
    dpo = compose_config(['loss=dpo', 'loss.beta=0.1'], tmp_path).loss
    assert (dpo.loss_type, dpo.average_log_prob, dpo.rpo_alpha, dpo.momentum, dpo.m0, dpo.beta_level, dpo.filter,
            list(dpo.beta_range), dpo.beta_dpo_scope) == ('sigmoid', False, 0, 0.9, None, 'batch', 'gaussian',
                                                          [0, None], 'microbatch')
    ipo = compose_config(['loss=ipo', 'loss.beta=0.1'], tmp_path).loss
    assert ipo.loss_type == 'ipo' and list(ipo.beta_range) == [0.5, 2.0]
    import train
    switches = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.loss_type=hinge',
                'loss.average_log_prob=true', 'loss.rpo_alpha=0.5', 'loss.momentum=1.0', 'loss.m0=0.25',
                'loss.beta_level=instance', 'loss.filter=tail', 'loss.beta_range=[0.5,null]', 'loss.beta_dpo_scope=step']
    assert train.validate_config(compose_config([*FAST, *switches], tmp_path)) == []


BAD_SWITCHES = [
    (['loss=dpo', 'loss.loss_type=ipo'], "loss.loss_type='ipo' is not a loss of loss=dpo; use loss=ipo"),
    (['loss=dpo', 'loss.loss_type=orpo'], "loss.loss_type='orpo' is not a loss of loss=dpo; use sigmoid or hinge"),
    (['loss=ipo', 'loss.loss_type=hinge'], "loss.loss_type='hinge' is not a loss of loss=ipo; use loss=dpo"),
    (['loss=dpo', 'loss.average_log_prob=maybe'], "loss.average_log_prob='maybe' must be true or false"),
    (['loss=dpo', 'loss.rpo_alpha=-1'], 'loss.rpo_alpha=-1 (α_RPO, the weight of the chosen NLL) must be a number ≥ 0'),
    (['loss=dpo', 'loss.momentum=1.5'], 'loss.momentum=1.5 (γ of the running margin statistics) must be a number in [0, 1]'),
    (['loss=dpo', 'loss.m0=high'], "loss.m0='high' (M0) must be a number, or null (the running mean)"),
    (['loss=dpo', 'loss.beta_level=pair'], "loss.beta_level='pair' is unknown; choose one of batch, instance"),
    (['loss=dpo', 'loss.filter=both'], "loss.filter='both' is unknown; choose one of gaussian, tail, head, none"),
    (['loss=ipo', 'loss.beta_dpo_scope=epoch'], "loss.beta_dpo_scope='epoch' is unknown; choose one of microbatch, step"),
    (['loss=ipo', 'loss.beta_range=[2,0.5]'], 'loss.beta_range=[2, 0.5] must be [r_lo, r_hi] with 0 ≤ r_lo ≤ 1 ≤ r_hi'),
    (['loss=dpo', 'loss.beta_range=0.5'], 'loss.beta_range=0.5 must be [r_lo, r_hi]'),
]


@pytest.mark.parametrize('overrides, message', BAD_SWITCHES, ids=[' '.join(o) for o, _ in BAD_SWITCHES])
def test_bad_switch_is_named_and_nothing_is_written(tmp_path, overrides, message):
    import train
    config = compose_config([*FAST, *overrides, 'loss.beta=0.1'], tmp_path)
    with pytest.raises(ValueError) as info:
        train.prepare_run(config)
    assert message in str(info.value), str(info.value)
    assert os.listdir(tmp_path) == []


def test_every_bad_switch_is_reported_at_once(tmp_path):
    import train
    problems = train.validate_config(compose_config(
        [*FAST, 'loss=dpo', 'loss.beta=0.1', 'loss.momentum=-0.1', 'loss.filter=both', 'loss.m0=high'], tmp_path))
    assert [p.split('=')[0] for p in problems] == ['loss.momentum', 'loss.m0', 'loss.filter']


# ----- the switches in the trainer -------------------------------------------------------------------

def first_step(tmp_path, overrides):
    """(metrics of the first training step, its batch's (8,) chosen log-probabilities before the step, the
    batch) of the embedded model, policy = reference."""
    from helpers import start_run
    trainer = start_run([*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=8', 'optimizer=SGD', 'lr=0.1', *overrides],
                        tmp_path)
    batch = next(iter(trainer.train_batches()))
    with torch.no_grad():
        chosen_logps, _ = trainer.concatenated_forward(trainer.policy, batch)
    return trainer.train_step(batch), chosen_logps, batch


@pytest.mark.slow
def test_hinge_with_beta_dpo_in_the_trainer(tmp_path):
    """Policy = reference gives h = 0 for every pair, so the hinge max(0, 1 − β·0) = 1 whatever β; β-DPO keeps
    k = ⌊8·0.75⌋ = 6 pairs (σ = 0 at the first step: no pair is an outlier) and β = β0 (every margin is μ = 0)."""
    metrics, _, _ = first_step(tmp_path, ['loss.loss_type=hinge', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.25',
                                          'loss.a=0.6'])
    assert metrics['loss/train'] == pytest.approx(1.0)
    assert metrics['record_train/mask_count'] == 6 and metrics['record_train/beta_used'] == pytest.approx(0.1)


@pytest.mark.slow
def test_rpo_term_in_the_trainer(tmp_path):
    """α_RPO = 0.5 at policy = reference: each pair's loss is ln 2 + 0.5·NLL, NLL = −log π(y_w)/|y_w| over the
    chosen response's labelled tokens, so loss/train = ln 2 + 0.5·mean(NLL)."""
    metrics, chosen_logps, batch = first_step(tmp_path, ['loss.rpo_alpha=0.5'])
    counts = (batch['chosen_labels'][:, 1:] != -100).sum(-1).float()
    nll = -chosen_logps / counts
    assert metrics['rpo_train/chosen_nll'] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert metrics['loss/train'] == pytest.approx(math.log(2) + 0.5 * nll.mean().item(), rel=1e-5)


@pytest.mark.slow
def test_average_log_prob_in_the_trainer(tmp_path):
    """loss.average_log_prob: the logged log-probabilities are the summed ones divided by each response's
    labelled tokens, for the same first batch; the loss at policy = reference stays ln 2."""
    _, summed, batch = first_step(tmp_path / 'sum', [])
    averaged_metrics, averaged, _ = first_step(tmp_path / 'mean', ['loss.average_log_prob=true',
                                                                   'loss.mode_loss=beta_DPO', 'loss.a=0.6'])
    counts = (batch['chosen_labels'][:, 1:] != -100).sum(-1).float()
    torch.testing.assert_close(averaged, summed / counts, rtol=1e-5, atol=1e-6)
    assert averaged_metrics['logps_train/chosen'] == pytest.approx(averaged.mean().item(), rel=1e-5)
    assert averaged_metrics['loss/train'] == pytest.approx(math.log(2), rel=1e-6)
