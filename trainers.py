"""Loss functions and trainers for SFT, DPO, IPO, conservative DPO and β-DPO.

The loss functions come first; they are pure functions of tensors (no communication, no config, no
hidden randomness), so they can be read and tested on their own:

    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=0.1)
    stats = MarginStats(device)                 # β-DPO running margin statistics
    stats.update(margins)                       # training microbatches only
    beta_used, keep = dynamic_beta(margins, stats.mean, stats.std, beta=0.1, a=0.6,
                                   mode_weight=0.2, generator=torch.Generator().manual_seed(0))

References:
    DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
    Conservative DPO: Mitchell 2023, "A note on DPO with noisy preferences" (label smoothing ε).
    IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        Preferences", Eq. 17.
    β-DPO: Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β", Eq. 6 (batch-level
        β) and Eq. 7 (β-guided data filtering).
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

# β-DPO keeps β above this floor so a batch of very negative margins cannot flip the sign of the
# loss (the reference implementation clamps at the same value).
MIN_DYNAMIC_BETA = 1e-3
# Below this the running standard deviation carries no information about which margins are
# outliers (at the first step policy == reference and every margin is exactly 0).
MIN_MARGIN_STD = 1e-8


def preference_loss(policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor,
                    reference_rejected_logps: torch.Tensor,
                    beta: Union[float, torch.Tensor],
                    label_smoothing: float = 0.0,
                    ipo: bool = False,
                    reference_free: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / conservative DPO / IPO losses and the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: log π(y|x) of the responses, shape (batch,).
        reference_chosen_logps, reference_rejected_logps: log π_ref(y|x), shape (batch,).
        beta: β, a float or a 0-dim tensor (β-DPO's dynamic β).
        label_smoothing: ε of conservative DPO, the assumed fraction of flipped labels; 0 is DPO.
        ipo: use the IPO loss instead (β plays the role of IPO's τ).
        reference_free: ignore the reference model (a uniform reference).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (batch,). The rewards are
        β·(log π − log π_ref), detached, with the β actually used.

    With h = (π_c − π_r) − (ref_c − ref_r):
        DPO:   −log σ(β·h)
        cDPO:  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
        IPO:   (h − 1/(2β))²
    """
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0 if reference_free else reference_chosen_logps - reference_rejected_logps
    h = pi_logratios - ref_logratios

    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)

    beta_for_rewards = beta.detach() if torch.is_tensor(beta) else beta
    chosen_rewards = beta_for_rewards * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta_for_rewards * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def _get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """Sum (or mean) of the log-probabilities of the label tokens.

    Args:
        logits: (batch, seq, vocab) unnormalised scores; position t predicts token t + 1.
        labels: (batch, seq) token ids, −100 where no loss is taken (prompt, padding).
        average_log_prob: return the mean per labelled token instead of the sum.

    Returns:
        (batch,) float32 log-probabilities. The log-softmax runs in float32 whatever the logits'
        dtype: in bfloat16 the normaliser of a 50k-token vocabulary loses about 3 significant
        digits, which is the size of the DPO log-ratios being compared.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree in (batch, seq)')
    labels = labels[:, 1:]
    logits = logits[:, :-1, :].float()
    loss_mask = labels != -100
    safe_labels = labels.masked_fill(~loss_mask, 0)
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=safe_labels.unsqueeze(2)).squeeze(2)
    summed = (per_token_logps * loss_mask).sum(-1)
    if average_log_prob:
        return summed / loss_mask.sum(-1).clamp(min=1)
    return summed


def _keep_indices(weights: torch.Tensor, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """k distinct indices drawn without replacement with probability proportional to `weights`.

    `torch.multinomial` refuses to draw more indices than there are non-zero weights, which happens
    when most margins are far outliers (their Gaussian weights underflow to 0). Then every pair with
    a non-zero weight is kept and the rest of the k are drawn uniformly from the zero-weight pairs.
    """
    positive = torch.nonzero(weights > 0).squeeze(1)
    if positive.numel() >= k:
        return torch.multinomial(weights, k, replacement=False, generator=generator)
    zero = torch.nonzero(weights <= 0).squeeze(1)
    fill = zero[torch.randperm(zero.numel(), generator=generator)[:k - positive.numel()]]
    return torch.cat([positive, fill])


def dynamic_beta(margins: torch.Tensor,
                 margin_mean: Union[float, torch.Tensor],
                 margin_std: Union[float, torch.Tensor],
                 beta: float,
                 a: float,
                 mode_weight: float,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """β-DPO's batch-level β and β-guided filter (Wu et al. 2024, Eqs. 6–7).

    Args:
        margins: (N,) implicit reward gaps of the whole batch across all ranks,
            m_i = (π_c − ref_c) − (π_r − ref_r), without β.
        margin_mean, margin_std: μ and σ, the running statistics (`MarginStats`).
        beta: β0, the configured β.
        a: α, how strongly β follows the batch's margins.
        mode_weight: ρ in [0, 1), the fraction of pairs the filter drops.
        generator: the only source of randomness. It is used on the CPU, so every rank that seeds
            it alike draws the same mask whatever device the margins live on.

    Returns:
        beta_used: detached 0-dim float32 tensor, max(1e-3, β0·(1 + α·(mean of m over kept − μ))).
        keep_mask: (N,) bool, True for the k = max(1, ⌊N·(1 − ρ)⌋) kept pairs, drawn without
            replacement with probability ∝ w_i = exp(−½((m_i − μ)/σ)²).

    Never NaN and never raises on valid shapes: when σ is 0 or non-finite, no pair can be called an
    outlier and all weights are 1; non-finite margins get weight 0 and are left out of β's mean.
    """
    m = margins.detach().float().cpu().reshape(-1)
    n = m.numel()
    mu = float(margin_mean)
    sigma = float(margin_std)

    k = max(1, int(n * (1 - mode_weight)))
    if k >= n:
        keep = torch.ones(n, dtype=torch.bool)
    else:
        if not (math.isfinite(sigma) and sigma > MIN_MARGIN_STD):
            weights = torch.ones(n)
        else:
            weights = torch.exp(-0.5 * ((m - mu) / sigma) ** 2)
        weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[_keep_indices(weights, k, generator)] = True

    kept = m[keep & torch.isfinite(m)]
    beta_used = torch.tensor(float(beta))
    if kept.numel() > 0 and a != 0 and math.isfinite(mu):
        beta_used = (beta * (1 + a * (kept.mean() - mu))).clamp(min=MIN_DYNAMIC_BETA)
        if not torch.isfinite(beta_used):
            beta_used = torch.tensor(float(beta))
    return beta_used.to(margins.device), keep.to(margins.device)


class MarginStats:
    """Running mean μ and standard deviation σ of β-DPO's reward margins.

    Exponential moving averages with momentum 0.9 of each training microbatch's (all-rank) margin
    mean and standard deviation, both starting at 0, as in the reference implementation. The batch
    standard deviation is the unbiased one (torch.std), and 0 for a single margin (torch gives NaN).
    Only training updates them: evaluation batches must not move the training threshold.
    """

    def __init__(self, device: Union[str, torch.device] = 'cpu', momentum: float = 0.9):
        self.momentum = momentum
        self.mean = torch.zeros((), device=device)
        self.std = torch.zeros((), device=device)

    @torch.no_grad()
    def update(self, margins: torch.Tensor) -> None:
        """Fold the (N,) margins of one training microbatch into the running statistics."""
        m = margins.detach().float().reshape(-1).to(self.mean.device)
        m = m[torch.isfinite(m)]
        if m.numel() == 0:
            return
        batch_std = m.std() if m.numel() > 1 else torch.zeros((), device=m.device)
        self.mean.mul_(self.momentum).add_(m.mean(), alpha=1 - self.momentum)
        self.std.mul_(self.momentum).add_(batch_std, alpha=1 - self.momentum)

    def state_dict(self) -> dict:
        return {'mean': self.mean.item(), 'std': self.std.item(), 'momentum': self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state['momentum'])
        self.mean.fill_(float(state['mean']))
        self.std.fill_(float(state['std']))
