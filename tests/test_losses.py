"""Worked numbers for the SFT / DPO / cDPO / IPO losses and `_get_batch_logps`."""
import math

import pytest
import torch
import torch.nn.functional as F

from logps import _get_batch_logps
from losses import preference_loss


def logps(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_policy_equal_reference_is_ln2():
    """policy == reference gives h = 0 and −log σ(0) = ln 2 = 0.693147 for every pair, whatever β."""
    p = logps(-3.0, -7.5, -1.25)
    for beta in (0.1, 0.5, torch.tensor(2.0)):
        losses, chosen_rewards, rejected_rewards = preference_loss(p, p - 1, p, p - 1, beta)
        torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
        assert losses[0].item() == pytest.approx(0.693147, abs=1e-6)
        torch.testing.assert_close(chosen_rewards, torch.zeros(3))
        torch.testing.assert_close(rejected_rewards, torch.zeros(3))


def test_dpo_worked_value():
    """π_c=−1, π_r=−3, ref_c=−2, ref_r=−2, β=0.5: h = 2, loss = −log σ(1) = log(1 + e^−1) = 0.313262."""
    losses, chosen, rejected = preference_loss(logps(-1), logps(-3), logps(-2), logps(-2), beta=0.5)
    assert losses.item() == pytest.approx(0.3132617, abs=1e-6)
    assert chosen.item() == pytest.approx(0.5)    # 0.5 · (−1 − −2)
    assert rejected.item() == pytest.approx(-0.5)  # 0.5 · (−3 − −2)


def test_label_smoothing_zero_equals_dpo_and_conservative_worked_value():
    """ε = 0 is DPO exactly. ε = 0.1, β = 1, h = 1:
    −0.9·log σ(1) − 0.1·log σ(−1) = 0.9·0.3132617 + 0.1·1.3132617 = 0.4132617."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) for _ in range(4))
    dpo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3)
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.0)
    torch.testing.assert_close(dpo, smoothed, rtol=0, atol=0)
    torch.testing.assert_close(dpo, -F.logsigmoid(0.3 * ((pc - pr) - (rc - rr))))

    cdpo, _, _ = preference_loss(logps(0), logps(-1), logps(0), logps(0), beta=1.0, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_worked_values():
    """IPO: (h − 1/(2β))². h = 2 with β = 0.5 gives (2 − 1)² = 1; with β = 0.25, (2 − 2)² = 0;
    h = 0 with β = 0.1 gives (0 − 5)² = 25."""
    args = (logps(-1), logps(-3), logps(-2), logps(-2))
    assert preference_loss(*args, beta=0.5, ipo=True)[0].item() == pytest.approx(1.0)
    assert preference_loss(*args, beta=0.25, ipo=True)[0].item() == pytest.approx(0.0)
    assert preference_loss(logps(-1), logps(-1), logps(-1), logps(-1), beta=0.1, ipo=True)[0].item() == pytest.approx(25.0)


def test_reference_free_ignores_the_reference_model():
    """reference_free: h = π_c − π_r = 2; with β = 1, loss = −log σ(2) = 0.126928 whatever the reference."""
    for ref_c, ref_r in ((0.0, 0.0), (-5.0, 7.0)):
        losses, _, _ = preference_loss(logps(-1), logps(-3), logps(ref_c), logps(ref_r), beta=1.0, reference_free=True)
        assert losses.item() == pytest.approx(0.1269280, abs=1e-6)


def test_rewards_use_the_beta_passed_in_and_are_detached():
    """A dynamic β of 0.3 (a 0-dim tensor): chosen reward 0.3·(−1 − −2) = 0.3, rejected 0.3·(−3 − −2) = −0.3.
    The original logged these with β0 even when β changed."""
    pc = logps(-1).requires_grad_()
    losses, chosen, rejected = preference_loss(pc, logps(-3), logps(-2), logps(-2), beta=torch.tensor(0.3))
    assert chosen.item() == pytest.approx(0.3)
    assert rejected.item() == pytest.approx(-0.3)
    assert not chosen.requires_grad and not rejected.requires_grad
    assert losses.requires_grad


def test_gradient_of_dpo_is_minus_beta_sigmoid_of_minus_beta_h():
    """d/dπ_c of −log σ(βh) = −β·σ(−βh); at h = 0, β = 0.1: −0.1·0.5 = −0.05."""
    pc = logps(-2).requires_grad_()
    losses, _, _ = preference_loss(pc, logps(-3), logps(-2), logps(-3), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05)


def explicit_logps(logits, labels, average):
    """The definition, one token at a time: token t + 1 is scored by the logits at position t."""
    out = []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(labels.shape[1] - 1):
            label = labels[b, t + 1].item()
            if label == -100:
                continue
            log_probs = logits[b, t].double().log_softmax(-1)
            total += log_probs[label].item()
            count += 1
        out.append(total / count if average else total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize('average', [False, True])
def test_get_batch_logps_equals_explicit_loop(average):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100          # prompt positions
    labels[1, 5:] = -100          # padding
    labels[2, 0] = -100           # the first position is never a target anyway
    got = _get_batch_logps(logits, labels, average_log_prob=average)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), explicit_logps(logits, labels, average), rtol=1e-5, atol=1e-5)


def test_get_batch_logps_worked_value_and_bfloat16_input():
    """Uniform logits over 4 tokens: each labelled token has log-prob ln(1/4) = −1.386294; 3 labelled
    tokens sum to −4.158883, mean −1.386294. bfloat16 logits are scored in float32."""
    logits = torch.zeros(1, 5, 4, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, -100, 1, 2, 3]])
    assert _get_batch_logps(logits, labels).item() == pytest.approx(-4.158883, abs=1e-5)
    assert _get_batch_logps(logits, labels, average_log_prob=True).item() == pytest.approx(-1.386294, abs=1e-5)


def test_get_batch_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='disagree'):
        _get_batch_logps(torch.zeros(2, 5, 4), torch.zeros(2, 6, dtype=torch.long))


def test_simpo_worked_values():
    """SimPO (Meng et al. 2024, Eq. 6), config/loss/simpo.yaml's β = 2, γ = 0.5, on mean token log-probs, no reference:
    equal means give −log σ(−0.5) = 0.974077; a chosen mean 0.5 nats above the rejected one gives z = 2·0.5 − 0.5 = 0.5
    and −log σ(0.5) = 0.474077. The reference log-probs are ignored, whatever they are."""
    from losses import OBJECTIVES
    equal, _, _ = preference_loss(logps(-2.0), logps(-2.0), logps(-9.0), logps(0.0), beta=2.0, loss_type='simpo',
                                  gamma=0.5)
    assert equal.item() == pytest.approx(0.974077, abs=1e-6)
    apart, _, _ = preference_loss(logps(-1.5), logps(-2.0), logps(3.0), logps(-7.0), beta=2.0, loss_type='simpo',
                                  gamma=0.5)
    assert apart.item() == pytest.approx(0.474077, abs=1e-6)
    assert OBJECTIVES['simpo'].loss(torch.tensor([0.5]), 2.0, gamma=0.5).item() == pytest.approx(0.474077, abs=1e-6)
    # label smoothing ε = 0.1 as in the authors' code: 0.9·0.474077 + 0.1·(−log σ(−0.5) = 0.974077) = 0.524077
    smoothed = OBJECTIVES['simpo'].loss(torch.tensor([0.5]), 2.0, gamma=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.524077, abs=1e-6)


def test_the_registry_says_which_loss_needs_a_reference_model(tmp_path):
    """LossMode reads the registry: DPO, hinge and IPO run a reference; SimPO never does; loss.reference_free drops
    it, unless β-DPO reads the margin with its reference term (the original's A_gap); SFT has none."""
    from helpers import compose_config
    from losses import LOSS_NAMES, LossMode

    def needs(*overrides):
        return LossMode.from_config(compose_config(list(overrides), tmp_path).loss).uses_reference_model
    assert LOSS_NAMES == ('sft', 'dpo', 'ipo', 'simpo', 'kto')
    assert needs('loss=kto', 'loss.beta=0.1') and needs('loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=epsilon_DPO')
    assert needs('loss=dpo', 'loss.beta=0.1') and needs('loss=ipo', 'loss.beta=0.1')
    assert needs('loss=dpo', 'loss.beta=0.1', 'loss.loss_type=hinge')
    assert not needs('loss=simpo') and not needs('loss=simpo', 'loss.mode_loss=beta_DPO') and not needs('loss=sft')
    assert not needs('loss=dpo', 'loss.beta=0.1', 'loss.reference_free=true')
    assert needs('loss=dpo', 'loss.beta=0.1', 'loss.reference_free=true', 'loss.mode_loss=beta_DPO')
