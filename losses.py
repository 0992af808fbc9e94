"""Every training objective, registered by name, and β-DPO's dynamic β and filter.

The objectives are pure functions of tensors with one signature, `loss(h, beta, **hyperparameters) -> (N,)`: the
per-pair losses from the implicit reward margins h and β (a float, a 0-dim tensor or one β per pair). Each is
registered under its `loss.loss_type` with the config file it belongs to (`loss=dpo`, `loss=ipo`, `loss=simpo`), the
`loss.*` keys it takes, and whether it reads a reference model; config validation, whether a reference model is
loaded (`LossMode.uses_reference_model`) and plotting read the registry, so a new objective is one function here,
one YAML in config/loss/ and one worked-number test in tests/test_losses.py (CONTRIBUTING.md):

    from losses import OBJECTIVES, LossMode, logratio_margins, preference_loss
    h = logratio_margins(pc, pr, rc, rr)                     # (N,) margins without β
    losses = OBJECTIVES['sigmoid'].loss(h, beta=0.1, label_smoothing=0.0)          # DPO, cDPO
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=0.1)   # the original's call
    mode = LossMode.from_config(config.loss)                 # what the configured loss needs, derived once

β-DPO (Wu et al. 2024) sits on top of any of them: it chooses β per batch from the margins and drops outlier pairs.
Its state over a run is `BetaDPO` (running margin statistics `MarginStats`, the filter's random streams):

    beta_dpo = BetaDPO(config.loss, seed)
    decision = beta_dpo.decide(margins_of_all_ranks, train=True)   # β per pair, kept pairs, metrics
    # the pieces, pure: dynamic_beta(margins, threshold, std, beta, a, mode_weight, generator), instance_betas(...),
    #   keep_mask(...), filter_weights(...); RPO's term: chosen_nll(pc, chosen_token_counts)

Why one registry in one file (not a module per loss, as torchtune does): the objectives are three to ten lines
each and share the margin, β and β-DPO; one file lets a reader compare them side by side, and the registry keeps
the rest of the code free of `loss_type ==` branches (TRL's 15-branch trainer is the counter-example).

References:
    DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
    Conservative DPO: Mitchell 2023, "A note on DPO with noisy preferences" (label smoothing ε).
    IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17.
    SLiC-HF: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (hinge loss).
    SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6.
    RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (DPO + NLL of the chosen response).
    β-DPO: Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β", Eq. 6 (batch-level β) and
        Eq. 7 (β-guided data filtering).
    KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8.
    ε-DPO: Lee et al. 2025, "KL Penalty Control via Perturbation for Direct Preference Optimization", arXiv 2502.13177.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

Beta = Union[float, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """One preference objective: `loss(h, beta, **hyperparameters)` -> (N,) per-pair losses."""
    name: str                           # its loss.loss_type
    family: str                         # the config file it is trained with: loss=FAMILY (config/loss/FAMILY.yaml)
    loss: Callable[..., torch.Tensor]
    # the loss.* keys passed to `loss` by name, each a number in [low, high) (None: no bound on that side)
    hyperparameters: Dict[str, Tuple[Optional[float], Optional[float]]]
    uses_reference: bool                # False: h has no reference term and no reference model is ever loaded
    # True: not a function of the margin h but of each response's log-ratio and a reference point z0 (KTO):
    #   loss(chosen_logratios, rejected_logratios, z0, beta, **hyperparameters) -> (N,)
    reference_point: bool = False


OBJECTIVES: Dict[str, Objective] = {}


def objective(name: str, family: str, hyperparameters: Optional[Dict[str, Tuple[Optional[float], Optional[float]]]] = None,
              uses_reference: bool = True, reference_point: bool = False):
    """Register the decorated function as the objective `name` (loss.loss_type) of `loss=family`."""
    def register(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        OBJECTIVES[name] = Objective(name, family, loss, dict(hyperparameters or {}), uses_reference, reference_point)
        return loss
    return register


# ε of conservative DPO: a fraction of flipped labels, below one half (at ½ the labels carry no information)
LABEL_SMOOTHING = (0.0, 0.5)


@objective('sigmoid', family='dpo', hyperparameters={'label_smoothing': LABEL_SMOOTHING})
def dpo_loss(h: torch.Tensor, beta: Beta, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO (Mitchell 2023): −(1−ε)·log σ(β·h) − ε·log σ(−β·h).

    ε = label_smoothing, the assumed fraction of flipped labels; 0 is DPO. h = 0 gives ln 2 = 0.693147 whatever β.
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


@objective('hinge', family='dpo')
def hinge_loss(h: torch.Tensor, beta: Beta) -> torch.Tensor:
    """SLiC-HF's hinge (Zhao et al. 2023, Eq. 1) with the margin δ = 1/β in units of h, as TRL's loss_type='hinge':
    max(0, 1 − β·h). h = 0 gives 1."""
    return torch.relu(1 - beta * h)


@objective('ipo', family='ipo')
def ipo_loss(h: torch.Tensor, beta: Beta) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with β as its τ: (h − 1/(2β))². h = 0 at β = 0.1 gives 25.

    h is the margin of summed (per-sequence) log-probabilities, as the original code; TRL divides each log-ratio
    by its completion length first, which loss.average_log_prob=true reproduces exactly."""
    return (h - 1 / (2 * beta)) ** 2


@objective('simpo', family='simpo', hyperparameters={'gamma': (None, None), 'label_smoothing': LABEL_SMOOTHING},
           uses_reference=False)
def simpo_loss(h: torch.Tensor, beta: Beta, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β·h − γ), with h the gap of the responses' mean token log-probs
    (loss.average_log_prob=true in config/loss/simpo.yaml) and no reference model; γ is the target reward margin.
    Label smoothing ε as in the authors' code (−(1−ε)·log σ(z) − ε·log σ(−z), z = β·h − γ). h = 0 at γ = 0.5 gives
    −log σ(−0.5) = 0.974077."""
    z = beta * h - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# KTO's weights λ_D, λ_U: non-negative; (0, None) admits 0, which drops that half of the loss
KTO_WEIGHT = (0.0, None)


@objective('kto', family='kto', hyperparameters={'desirable_weight': KTO_WEIGHT, 'undesirable_weight': KTO_WEIGHT},
           reference_point=True)
def kto_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, z0: Union[float, torch.Tensor],
             beta: Beta, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 8) on pairs, the chosen response desirable and the rejected undesirable
    (as TRL 1.16 builds a KTO dataset from pairs), per pair, shape (N,):

        ½·[λ_D·(1 − σ(β·(r_c − z0))) + λ_U·(1 − σ(β·(z0 − r_r)))],   r = log π(y|x) − log π_ref(y|x)

    chosen_logratios r_c, rejected_logratios r_r: (N,); z0: KTO's reference point (`kto_reference_point`, detached);
    λ_D = desirable_weight, λ_U = undesirable_weight. The ½ makes the mean over pairs TRL's mean over the 2N
    examples. r_c = r_r = z0 = 0 (policy = reference) gives ½·(λ_D + λ_U)·½ = 0.5 at weights 1, whatever β.
    """
    desirable = 1 - torch.sigmoid(beta * (chosen_logratios - z0))
    undesirable = 1 - torch.sigmoid(beta * (z0 - rejected_logratios))
    return 0.5 * (desirable_weight * desirable + undesirable_weight * undesirable)


def kto_reference_point(mismatched_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, Eq. 8 and §4.1): the batch estimate of KL(π‖π_ref), the mean over the
    whole batch (all ranks) of log π(y'|x) − log π_ref(y'|x) for mismatched pairs (x, y') (each prompt with another
    pair's completion), clamped at 0 and detached, as TRL 1.16's KTOTrainer (its `kl` term). (M,) -> 0-dim."""
    m = mismatched_logratios.detach().float().reshape(-1)
    return m.mean().clamp(min=0) if m.numel() else torch.zeros((), device=m.device)


def family_objectives(family: str) -> List[str]:
    """The loss.loss_type values of `loss=family`, in registration order."""
    return [name for name, o in OBJECTIVES.items() if o.family == family]


# loss=sft trains on the chosen responses alone: the one loss that is not an objective of pairs.
SFT = 'sft'
# The loss= choices (config/loss/*.yaml): SFT and every family of the registry.
LOSS_NAMES = (SFT, *dict.fromkeys(o.family for o in OBJECTIVES.values()))


def logratio_margins(policy_chosen_logps: torch.Tensor,
                     policy_rejected_logps: torch.Tensor,
                     reference_chosen_logps: torch.Tensor,
                     reference_rejected_logps: torch.Tensor,
                     reference_free: bool = False) -> torch.Tensor:
    """h = (log π_c − log π_r) − (log π_ref_c − log π_ref_r) per pair, shape (batch,): the implicit reward margin
    without β, which every objective is a function of and β-DPO's statistics and filter read.
    reference_free drops the reference term (a uniform reference)."""
    h = policy_chosen_logps - policy_rejected_logps
    return h if reference_free else h - (reference_chosen_logps - reference_rejected_logps)


def preference_loss(policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor,
                    reference_rejected_logps: torch.Tensor,
                    beta: Beta,
                    label_smoothing: float = 0.0,
                    ipo: bool = False,
                    reference_free: bool = False,
                    loss_type: str = 'sigmoid',
                    **hyperparameters: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's `preference_loss`: per-pair losses of `loss_type` and the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: log π(y|x) of the responses, shape (batch,): summed over the
            response's tokens, or their mean (loss.average_log_prob).
        reference_chosen_logps, reference_rejected_logps: log π_ref(y|x), shape (batch,), summed or averaged alike.
        beta: β, a float, a 0-dim tensor (β-DPO's batch-level β) or a (batch,) tensor (one β per pair).
        label_smoothing: ε of conservative DPO (and SimPO); ignored by the objectives that take none.
        ipo: the same as loss_type='ipo' (the original's argument).
        reference_free: ignore the reference model (a uniform reference); always so for SimPO.
        loss_type: a name of OBJECTIVES: 'sigmoid' (DPO / cDPO), 'hinge' (SLiC), 'ipo', 'simpo'.
        hyperparameters: the objective's other keys (SimPO's gamma).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (batch,). The rewards are β·(log π − log π_ref),
        detached, with the β actually used.
    """
    name = 'ipo' if ipo else loss_type
    pairwise = [key for key, objective in OBJECTIVES.items() if not objective.reference_point]
    if name not in pairwise:  # KTO takes each response's own log-ratio and z0, not the pair's margin h
        raise ValueError(f'loss_type={loss_type!r} is not one of {", ".join(pairwise)}')
    chosen = OBJECTIVES[name]
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                         reference_free or not chosen.uses_reference)
    options = {'label_smoothing': label_smoothing, **hyperparameters}
    losses = chosen.loss(h, beta, **{key: options[key] for key in chosen.hyperparameters if key in options})
    beta_for_rewards = beta.detach() if torch.is_tensor(beta) else beta
    chosen_rewards = beta_for_rewards * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta_for_rewards * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """RPO's negative log-likelihood term per pair: −log π(y_w|x) / |y_w|, shape (batch,).

    Args:
        policy_chosen_logps: (batch,) summed log-probabilities of the chosen responses (with
            loss.average_log_prob they are already means: pass counts of 1).
        chosen_token_counts: (batch,) labelled tokens of each chosen response.

    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", the L_DPO+NLL objective) adds
    α·NLL of the chosen response to each pair's preference loss, the NLL divided by the length of that
    response (its chain of thought and answer, |c_w| + |y_w|), not of the prompt: a mean per pair. TRL 1.16 has no
    `rpo_alpha`; its loss_type 'sft' term is one token mean over the whole batch, which weights long responses more.
    A response without labelled tokens contributes 0.
    """
    return -policy_chosen_logps / chosen_token_counts.to(policy_chosen_logps.dtype).clamp(min=1)


# ----- β-DPO ------------------------------------------------------------------------------------------------------

# β-DPO keeps β above this floor so a batch of very negative margins cannot flip the sign of the
# loss (the reference implementation clamps at the same value).
MIN_DYNAMIC_BETA = 1e-3
# Below this the running standard deviation carries no information about which margins are
# outliers (at the first step policy == reference and every margin is exactly 0).
MIN_MARGIN_STD = 1e-8

# The values of β-DPO's switches (config/loss/dpo.yaml); the config's schema checks against them.
MODE_LOSSES = ('mean', 'beta_DPO', 'epsilon_DPO')   # loss.mode_loss
BETA_LEVELS = ('batch', 'instance')             # loss.beta_level
FILTERS = ('gaussian', 'tail', 'head', 'none')  # loss.filter
BETA_DPO_SCOPES = ('microbatch', 'step')        # loss.beta_dpo_scope
# loss.mode_loss=beta_DPO reads these; with mode_loss=mean a value other than the YAML's default does nothing
# (config_schema refuses it). `a` and `m0` are in units of the margin h, without β.
BETA_DPO_SWITCHES = ('mode_weight', 'a', 'momentum', 'm0', 'beta_level', 'filter', 'beta_range', 'beta_dpo_scope')

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


def filter_weights(margins: torch.Tensor, threshold: float, std: float, filter: str = 'gaussian') -> torch.Tensor:
    """(N,) float32 weights of β-DPO's filter: a pair is kept with probability ∝ its weight.

    With z_i = (m_i − M0)/σ, the margin's distance from the threshold M0 in running standard deviations,
    the tail of the margins is the low side (z < 0: pairs the policy separates less than usual, among
    them the mislabelled pairs with negative margins) and the head the high side (z > 0: pairs already
    well separated, the easy ones):
        gaussian (Eq. 7, the paper's method and its "filter tail & head" ablation): exp(−½ z²), both sides
        tail ("filter tail"): exp(−½ min(z, 0)²), the low side only; every pair with m_i ≥ M0 weighs 1
        head ("filter head"): exp(−½ max(z, 0)²), the high side only; every pair with m_i ≤ M0 weighs 1
        none: 1 for every pair; `keep_mask` then keeps every pair whatever ρ (no filter, β still dynamic)
    The one-sided filters keep the paper's sampler and weight and only switch off one side of it, so the
    ablations differ in nothing but the side; the paper's own text on the head/tail ablations was not
    available to us, so this reading of "head" (largest margins) and "tail" (smallest) is ours.
    When σ is 0 or not finite no pair can be called an outlier and every weight is 1; otherwise a weight
    that is not finite (a NaN margin) is 0, and an infinite margin weighs 0 on a side the filter drops.
    """
    m = margins.detach().float().cpu().reshape(-1)
    if filter not in FILTERS:
        raise ValueError(f'filter={filter!r} is not one of {", ".join(FILTERS)}')
    if not (math.isfinite(std) and std > MIN_MARGIN_STD) or filter == 'none':
        weights = torch.ones_like(m)
    else:
        z = (m - threshold) / std
        if filter == 'tail':
            z = z.clamp(max=0)
        elif filter == 'head':
            z = z.clamp(min=0)
        weights = torch.exp(-0.5 * z ** 2)
    return torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))


def keep_mask(margins: torch.Tensor, threshold: float, std: float, mode_weight: float, filter: str = 'gaussian',
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N,) bool on the CPU: the k = max(1, ⌊N·(1 − ρ)⌋) pairs β-DPO's filter keeps (all N for filter='none').

    Drawn without replacement with probability ∝ `filter_weights(margins, threshold, std, filter)`, from
    `generator` only (used on the CPU, so every rank that seeds it alike draws the same mask).
    """
    n = margins.numel()
    k = n if filter == 'none' else max(1, int(n * (1 - mode_weight)))
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_keep_indices(filter_weights(margins, threshold, std, filter), k, generator)] = True
    return keep


def beta_bounds(beta: float, beta_range: Tuple[float, Optional[float]] = (0.0, None)) -> Tuple[float, float]:
    """(lowest, highest) dynamic β: [max(1e-3, r_lo·β0), r_hi·β0], the upper bound ∞ when r_hi is None.

    loss.beta_range = [r_lo, r_hi]. DPO's default [0, null] is the reference implementation's clamp at
    1e-3. IPO's default [0.5, 2] keeps IPO's target gap 1/(2β) within a factor 2 of the configured
    1/(2β0): unbounded, a batch of very negative margins drives β to 1e-3 and the target to 500 (100× the
    usual 5 at β0 = 0.1), and the gradient 2·(h − 1/(2β)) of every pair with it.
    """
    low, high = beta_range
    return max(MIN_DYNAMIC_BETA, low * beta), math.inf if high is None else high * beta


def dynamic_beta(margins: torch.Tensor,
                 threshold: Union[float, torch.Tensor],
                 margin_std: Union[float, torch.Tensor],
                 beta: float,
                 a: float,
                 mode_weight: float,
                 generator: Optional[torch.Generator] = None,
                 filter: str = 'gaussian',
                 beta_range: Tuple[float, Optional[float]] = (0.0, None)) -> Tuple[torch.Tensor, torch.Tensor]:
    """β-DPO's batch-level β and β-guided filter (Wu et al. 2024, Eqs. 6–7).

    Args:
        margins: (N,) implicit reward gaps of the whole batch across all ranks,
            m_i = (π_c − ref_c) − (π_r − ref_r), without β.
        threshold: M0, the running mean μ of the margins (`MarginStats.threshold`), or a fixed m0.
        margin_std: σ, the running standard deviation (`MarginStats.std`).
        beta: β0, the configured β.
        a: α, how strongly β follows the batch's margins.
        mode_weight: ρ in [0, 1), the fraction of pairs the filter drops.
        generator: the only source of randomness. It is used on the CPU, so every rank that seeds
            it alike draws the same mask whatever device the margins live on.
        filter: which side of the margins the filter drops, see `filter_weights`.
        beta_range: [r_lo, r_hi], the bounds of β as multiples of β0, see `beta_bounds`.

    Returns:
        beta_used: detached 0-dim float32 tensor, β0·(1 + α·(mean of m over kept − M0)) clamped to
            `beta_bounds` (by default max(1e-3, ·)).
        keep_mask: (N,) bool, True for the kept pairs (`keep_mask`): k = max(1, ⌊N·(1 − ρ)⌋) of them,
            drawn without replacement with probability ∝ w_i = exp(−½((m_i − M0)/σ)²) (gaussian).

    Never NaN and never raises on valid shapes: when σ is 0 or non-finite, no pair can be called an
    outlier and all weights are 1; non-finite margins get weight 0 and are left out of β's mean.
    """
    m = margins.detach().float().cpu().reshape(-1)
    mu = float(threshold)
    keep = keep_mask(m, mu, float(margin_std), mode_weight, filter, generator)
    kept = m[keep & torch.isfinite(m)]
    beta_used = torch.tensor(float(beta))
    if kept.numel() > 0 and a != 0 and math.isfinite(mu):
        low, high = beta_bounds(beta, beta_range)
        beta_used = (beta * (1 + a * (kept.mean() - mu))).clamp(min=low, max=high)
        if not torch.isfinite(beta_used):
            beta_used = torch.tensor(float(beta))
    return beta_used.to(margins.device), keep.to(margins.device)


def instance_betas(margins: torch.Tensor, threshold: Union[float, torch.Tensor], beta: float, a: float,
                   beta_range: Tuple[float, Optional[float]] = (0.0, None)) -> torch.Tensor:
    """β-DPO's instance-level ablation: one β per pair, β_i = β0·(1 + α·(m_i − M0)), shape (N,).

    Clamped to `beta_bounds` like the batch-level β; detached float32 on the margins' device. A pair
    whose margin (or M0) is not finite gets β0. With every margin equal to the kept mean M̄ it equals the
    batch-level β0·(1 + α·(M̄ − M0)) for every pair.
    """
    m = margins.detach().float().reshape(-1)
    mu = float(threshold)
    if a == 0 or not math.isfinite(mu):
        return torch.full_like(m, float(beta))
    low, high = beta_bounds(beta, beta_range)
    betas = (beta * (1 + a * (m - mu))).clamp(min=low, max=high)
    return torch.where(torch.isfinite(betas), betas, torch.full_like(betas, float(beta)))


class MarginStats:
    """Running mean μ and standard deviation σ of β-DPO's reward margins, and the threshold M0.

    Exponential moving averages with momentum γ (loss.momentum, 0.9 in the reference implementation)
    of each training batch's (all-rank) margin mean and standard deviation, both starting at 0. The
    batch standard deviation is the unbiased one (torch.std), and 0 for a single margin (torch gives
    NaN). Only training updates them: evaluation batches must not move the training threshold.
    M0 (`threshold`) is μ, or a fixed m0 (loss.m0, the paper's fixed-threshold ablation); σ always runs.
    With γ = 1 nothing moves: μ and σ stay 0, so M0 = 0 and, σ being 0, every filter weight is 1 and the
    filter drops ρ of the pairs uniformly at random. That is not m0 = 0: there σ keeps running and the
    Gaussian filter centred on 0 works.
    """

    def __init__(self, device: Union[str, torch.device] = 'cpu', momentum: float = 0.9, m0: Optional[float] = None):
        self.momentum = momentum
        self.m0 = m0
        self.mean = torch.zeros((), device=device)
        self.std = torch.zeros((), device=device)

    @property
    def threshold(self) -> torch.Tensor:
        """M0: the fixed m0 if one is set, else the running mean μ (0-dim, on the statistics' device)."""
        return self.mean if self.m0 is None else torch.full_like(self.mean, float(self.m0))

    @torch.no_grad()
    def update(self, margins: torch.Tensor) -> None:
        """Fold the (N,) margins of one training batch into the running statistics."""
        m = margins.detach().float().reshape(-1).to(self.mean.device)
        m = m[torch.isfinite(m)]
        if m.numel() == 0:
            return
        batch_std = m.std() if m.numel() > 1 else torch.zeros((), device=m.device)
        self.mean.mul_(self.momentum).add_(m.mean(), alpha=1 - self.momentum)
        self.std.mul_(self.momentum).add_(batch_std, alpha=1 - self.momentum)

    def state_dict(self) -> dict:
        """The running state (m0 is a setting: it comes from the config, and a resume may not change it)."""
        return {'mean': self.mean.item(), 'std': self.std.item(), 'momentum': self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state['momentum'])
        self.mean.fill_(float(state['mean']))
        self.std.fill_(float(state['std']))


class BetaDPOBatch(NamedTuple):
    """β-DPO's decision for one batch of N pairs gathered over all ranks: what each pair's loss uses."""
    betas: torch.Tensor  # (N,) float32, the β of each pair (all equal at beta_level=batch)
    keep: torch.Tensor  # (N,) bool, the pairs the filter keeps
    metrics: Dict[str, List[float]]  # logged as record_{train,eval}/: beta_used, mask_count, kept_fraction, gap_*


class BetaDPO:
    """β-DPO over a run: the running margin statistics, the filter's random streams, and for each batch of (N,)
    margins gathered over all ranks the β of each pair and the pairs the filter keeps (`decide`).

    Identical on every rank by construction: the same margins, the same statistics, and a generator seeded
    alike everywhere that nothing else draws from. Evaluation draws from its own generator, re-seeded at the
    start of each evaluation (`start_evaluation`), so an evaluation's draws depend only on the seed and the step,
    each evaluation batch continues the stream of the one before it, and the training stream never shifts.
    """

    def __init__(self, loss_config: DictConfig, seed: int, device: Union[str, torch.device] = 'cpu'):
        self.config = loss_config
        self.margin_stats = (MarginStats(device, momentum=loss_config.momentum, m0=loss_config.m0)
                             if 'momentum' in loss_config else MarginStats(device))  # loss=sft has no β-DPO keys
        self.filter_generator = torch.Generator().manual_seed(seed)
        self.eval_filter_generator = torch.Generator()

    def start_evaluation(self, seed: int) -> None:
        self.eval_filter_generator.manual_seed(seed)

    def decide(self, margins: torch.Tensor, train: bool) -> BetaDPOBatch:
        """β per pair, the kept pairs and the metrics of a batch of (N,) margins gathered over all ranks.

        beta_level=batch gives every pair the batch's β (`batch_beta_and_mask`); beta_level=instance gives
        each pair its own (`instance_betas`), read after the same statistics update, with the same filter.
        """
        beta_used, keep = self.batch_beta_and_mask(margins, train)
        if self.config.beta_level == 'instance':
            betas = instance_betas(margins, self.margin_stats.threshold, self.config.beta, self.config.a,
                                   tuple(self.config.beta_range)).to(margins.device)
            beta_used = betas[keep].mean()
        else:
            betas = beta_used.to(margins.device).expand(margins.shape[0])
        metrics = {'beta_used': [beta_used.item()], 'mask_count': [int(keep.sum())],
                   'kept_fraction': [keep.float().mean().item()],
                   'gap_mean': [self.margin_stats.mean.item()], 'gap_std': [self.margin_stats.std.item()]}
        return BetaDPOBatch(betas, keep, metrics)

    def batch_beta_and_mask(self, margins: torch.Tensor, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch-level β (0-dim) and the keep mask. The running statistics are updated in training only,
        before dynamic_beta reads them (the reference implementation's order)."""
        if train:
            self.margin_stats.update(margins)
        generator = self.filter_generator if train else self.eval_filter_generator
        return dynamic_beta(margins, self.margin_stats.threshold, self.margin_stats.std, self.config.beta,
                            self.config.a, self.config.mode_weight, generator=generator, filter=self.config.filter,
                            beta_range=tuple(self.config.beta_range))

    def state_dict(self) -> dict:
        return {'margin_stats': self.margin_stats.state_dict(), 'filter_generator': self.filter_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.margin_stats.load_state_dict(state['margin_stats'])
        self.filter_generator.set_state(state['filter_generator'])


# ----- ε-DPO ------------------------------------------------------------------------------------------------------
#
# Lee et al. 2025, "KL Penalty Control via Perturbation for Direct Preference Optimization" (arXiv 2502.13177), and
# the authors' code (github oddqueue/e-dpo, trainer.py). The policy trained with β is, in the optimum of DPO,
# π_β ∝ π_ref·exp(r/β); the policy at the perturbed β' = β/(1 ± ε) is then ∝ π_ref^(∓ε)·π_β^(1 ± ε), which the authors
# estimate token by token from the logits z: the ε-perturbed policies have logits (1 + ε)·z_π − ε·z_ref (β/(1+ε),
# weaker KL penalty) and (1 − ε)·z_π + ε·z_ref (β/(1 − ε), stronger), so they need the reference's per-token full-vocabulary logits, not its per-sequence log-probabilities:
# logps.perturbed_label_logps computes them from both models' hidden states a chunk at a time, and the precomputed
# reference (reference_cache, per-sequence log-probabilities only) cannot serve ε-DPO (config_schema refuses it).
#
# Per pair i, with ℓ = log π(y_w|x) − log π(y_l|x) under the policy and ℓ⁺, ℓ⁻ under the two perturbed policies
# (no reference term: the code compares the policies' own log-ratios), the step
#     s_i = +1 if ℓ⁺ > ℓ > ℓ⁻ (relaxing the penalty makes the policy a more confident preference model),
#           −1 if ℓ⁻ > ℓ > ℓ⁺, else 0,
# and the pair's β_i = β/(1 + ε·s_i) (the code's `updated_beta`). After each optimizer step the baseline β itself
# moves: β ← β/(1 + ε·s̄), s̄ the mean of s over the step's pairs on all ranks (the code accumulates the microbatch
# means over gradient accumulation and gathers over processes). At the first step policy = reference, ℓ⁺ = ℓ = ℓ⁻,
# every s_i = 0 and the loss is ln 2.

def epsilon_steps(logratios: torch.Tensor, plus_logratios: torch.Tensor, minus_logratios: torch.Tensor) -> torch.Tensor:
    """ε-DPO's step s_i ∈ {−1, 0, +1} per pair, (N,) float32, from the policy's log-ratio ℓ and the perturbed
    policies' ℓ⁺ (logits (1+ε)z_π − εz_ref) and ℓ⁻ (logits (1−ε)z_π + εz_ref): +1 where ℓ⁺ > ℓ > ℓ⁻, −1 where
    ℓ⁻ > ℓ > ℓ⁺, 0 otherwise (strict inequalities, as the authors' code)."""
    l, plus, minus = logratios.detach().float(), plus_logratios.detach().float(), minus_logratios.detach().float()
    up = (plus > l) & (l > minus)
    down = (minus > l) & (l > plus)
    return up.float() - down.float()


def epsilon_betas(beta: Union[float, torch.Tensor], epsilon: float, steps: torch.Tensor) -> torch.Tensor:
    """ε-DPO's per-pair β_i = β/(1 + ε·s_i), (N,) float32, detached; β = 0.1, ε = 0.01: s = +1 → 0.0990099,
    s = −1 → 0.1010101, s = 0 → 0.1."""
    return (float(beta) / (1 + epsilon * steps.detach().float()))


class EpsilonBeta:
    """ε-DPO's baseline β over a run: β ← β/(1 + ε·s̄) after each optimizer step, s̄ the mean step of its pairs
    over all ranks and microbatches. Saved with the trainer's state (`state_dict`)."""

    def __init__(self, beta: float, epsilon: float):
        self.beta = float(beta)
        self.epsilon = float(epsilon)

    def update(self, mean_step: float) -> None:
        if math.isfinite(mean_step):
            self.beta = self.beta / (1 + self.epsilon * mean_step)

    def state_dict(self) -> dict:
        return {'epsilon_beta': self.beta}

    def load_state_dict(self, state: dict) -> None:
        if 'epsilon_beta' in state:
            self.beta = float(state['epsilon_beta'])


@dataclass(frozen=True)
class LossMode:
    """What the configured loss needs, derived once from config.loss (as torchtune's `is_reference_free`)."""
    sft: bool                          # loss=sft: the negative log-likelihood of the chosen responses
    beta_dpo: bool                     # loss.mode_loss=beta_DPO: dynamic β and the β-guided filter
    objective: Optional[Objective] = None   # the preference objective (loss.loss_type); None for SFT
    hyperparameters: Tuple[Tuple[str, float], ...] = ()   # (key, value) of the objective's loss.* keys
    reference_free: bool = False       # the loss's margin has no reference term (loss.reference_free, SimPO)
    step_scope: bool = False           # loss.beta_dpo_scope=step: β-DPO decides once per optimizer step
    average_log_prob: bool = False     # loss.average_log_prob: responses scored by their mean token log-prob
    epsilon_dpo: bool = False          # loss.mode_loss=epsilon_DPO: ε-DPO's per-pair β (needs the reference's logits)
    epsilon: float = 0.0               # loss.epsilon, ε-DPO's ε

    @property
    def kto(self) -> bool:
        """The objective is KTO's (a function of each response's log-ratio and the reference point z0)."""
        return self.objective is not None and self.objective.reference_point

    @property
    def uses_reference_model(self) -> bool:
        """Whether a reference model (or, with LoRA, the policy with its adapters off) is run: by every objective
        that reads one, unless loss.reference_free drops it; β-DPO's statistics and filter read the margin with the
        reference term (the original's A_gap) even when the loss does not, so β-DPO keeps it then."""
        if self.sft or not self.objective.uses_reference:
            return False
        return self.beta_dpo or not self.reference_free

    def losses(self, h: torch.Tensor, beta: Beta) -> torch.Tensor:
        """The objective's (N,) per-pair losses of margins `h` (without the reference term if `reference_free`)."""
        return self.objective.loss(h, beta, **dict(self.hyperparameters))

    def kto_losses(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, z0: torch.Tensor,
                   beta: Beta) -> torch.Tensor:
        """KTO's (N,) per-pair losses (`kto_loss`) with this config's weights."""
        return self.objective.loss(chosen_logratios, rejected_logratios, z0, beta, **dict(self.hyperparameters))

    @classmethod
    def from_config(cls, loss_config: DictConfig) -> 'LossMode':
        if loss_config.name == SFT:
            return cls(sft=True, beta_dpo=False)
        chosen = OBJECTIVES[loss_config.loss_type]
        beta_dpo = loss_config.mode_loss == 'beta_DPO'
        return cls(sft=False, beta_dpo=beta_dpo, objective=chosen,
                   hyperparameters=tuple((key, loss_config[key]) for key in chosen.hyperparameters),
                   reference_free=bool(loss_config.reference_free) or not chosen.uses_reference,
                   step_scope=beta_dpo and loss_config.beta_dpo_scope == 'step',
                   average_log_prob=bool(loss_config.average_log_prob),
                   epsilon_dpo=loss_config.mode_loss == 'epsilon_DPO', epsilon=float(loss_config.get('epsilon', 0.0)))
