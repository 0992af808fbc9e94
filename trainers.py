"""Loss functions and trainers for SFT, DPO, IPO, conservative DPO and β-DPO.

The loss functions come first; they are pure functions of tensors (no communication, no config, no
hidden randomness), so they can be read and tested on their own:

    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=0.1)
    stats = MarginStats(device)                 # β-DPO running margin statistics
    stats.update(margins)                       # training microbatches only
    beta_used, keep = dynamic_beta(margins, stats.threshold, stats.std, beta=0.1, a=0.6,
                                   mode_weight=0.2, generator=torch.Generator().manual_seed(0))
    # the paper's ablations and other objectives (config/loss/dpo.yaml):
    betas = instance_betas(margins, stats.threshold, beta=0.1, a=0.6)        # beta_level=instance
    dynamic_beta(..., filter='tail')                                          # filter=tail|head|none
    preference_loss(..., beta=betas, loss_type='hinge')                       # SLiC's hinge
    losses + 0.5 * chosen_nll(pc, chosen_token_counts)                        # RPO, rpo_alpha=0.5

The trainers come after: BasicTrainer (one process), then FSDPTrainer and TensorParallelTrainer,
which split the model over several processes (train.py starts them, or torchrun does) and change only
how the model is placed, how gradients are clipped and how state is gathered for checkpoints.

References:
    DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7.
    Conservative DPO: Mitchell 2023, "A note on DPO with noisy preferences" (label smoothing ε).
    IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        Preferences", Eq. 17.
    β-DPO: Wu et al. 2024, "β-DPO: Direct Preference Optimization with Dynamic β", Eq. 6 (batch-level
        β) and Eq. 7 (β-guided data filtering).
    SLiC-HF: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (hinge loss).
    RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization" (DPO + NLL of the chosen response).
    SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
        (length-normalised log-probabilities).
"""
import contextlib
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import tqdm
from omegaconf import DictConfig

from checkpoints import TrainerCheckpointing, append_metrics, kept_checkpoint
from distributed import (all_gather_if_needed, any_process, clip_grad_norm, fsdp_split, gathered_model_state,
                         gathered_optimizer_state, load_gathered_optimizer_state, split_and_load, tensor_parallel_split)
from generation import draw_samples, generate_texts, log_sample_tables, print_samples
from logps import concatenated_logps, forward_logps
from lora import lora_enabled
from models import enable_activation_checkpointing, first_device, load_tokenizer
from optimization import build_optimizer, total_training_steps
from preference_datasets import batch_iterator_kwargs, get_batch_iterator, padding_fraction
from reference_cache import ReferenceLogps, reference_cache_path, reference_pass_batches
from synthetic_task import gold_eval_accuracy
from utils import (DummyWandb, StopRequest, extend_metrics, formatted_dict, mean_metrics, rank0_print,
                   slice_and_move_batch_for_device)

# β-DPO keeps β above this floor so a batch of very negative margins cannot flip the sign of the
# loss (the reference implementation clamps at the same value).
MIN_DYNAMIC_BETA = 1e-3
# Below this the running standard deviation carries no information about which margins are
# outliers (at the first step policy == reference and every margin is exactly 0).
MIN_MARGIN_STD = 1e-8

# The values of the loss switches (config/loss/*.yaml); train.py validates the config against them.
LOSS_TYPES = ('sigmoid', 'hinge', 'ipo')        # loss.loss_type
BETA_LEVELS = ('batch', 'instance')             # loss.beta_level
FILTERS = ('gaussian', 'tail', 'head', 'none')  # loss.filter
BETA_DPO_SCOPES = ('microbatch', 'step')        # loss.beta_dpo_scope


def preference_loss(policy_chosen_logps: torch.Tensor,
                    policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor,
                    reference_rejected_logps: torch.Tensor,
                    beta: Union[float, torch.Tensor],
                    label_smoothing: float = 0.0,
                    ipo: bool = False,
                    reference_free: bool = False,
                    loss_type: str = 'sigmoid') -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO / conservative DPO / hinge (SLiC) / IPO losses and the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: log π(y|x) of the responses, shape (batch,): summed
            over the response's tokens, or their mean (loss.average_log_prob, the length-normalised
            SimPO-style objective).
        reference_chosen_logps, reference_rejected_logps: log π_ref(y|x), shape (batch,), summed or
            averaged alike.
        beta: β, a float, a 0-dim tensor (β-DPO's batch-level β) or a (batch,) tensor (one β per pair,
            β-DPO's instance-level ablation).
        label_smoothing: ε of conservative DPO, the assumed fraction of flipped labels; 0 is DPO. Used
            by the sigmoid loss only.
        ipo: the same as loss_type='ipo' (kept for existing callers).
        reference_free: ignore the reference model (a uniform reference).
        loss_type: 'sigmoid' (DPO / cDPO), 'hinge' (SLiC) or 'ipo'.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (batch,). The rewards are
        β·(log π − log π_ref), detached, with the β actually used.

    With h = (π_c − π_r) − (ref_c − ref_r):
        sigmoid (DPO, Eq. 7; cDPO):  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)
        hinge (SLiC-HF, Zhao et al. 2023, Eq. 1 with the margin δ = 1/β in units of h, as TRL's
               loss_type='hinge'):  max(0, 1 − β·h)
        ipo (Azar et al. 2023, Eq. 17):  (h − 1/(2β))²
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f'loss_type={loss_type!r} is not one of {", ".join(LOSS_TYPES)}')
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                         reference_free)

    if ipo or loss_type == 'ipo':
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == 'hinge':
        losses = torch.relu(1 - beta * h)
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)

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
    response (its chain of thought and answer, |c_w| + |y_w|), not of the prompt; TRL's `rpo_alpha` takes
    the same mean over the chosen response's tokens. A response without labelled tokens contributes 0.
    """
    return -policy_chosen_logps / chosen_token_counts.to(policy_chosen_logps.dtype).clamp(min=1)


def logratio_margins(policy_chosen_logps: torch.Tensor,
                     policy_rejected_logps: torch.Tensor,
                     reference_chosen_logps: torch.Tensor,
                     reference_rejected_logps: torch.Tensor,
                     reference_free: bool = False) -> torch.Tensor:
    """h = (log π_c − log π_r) − (log π_ref_c − log π_ref_r) per pair, shape (batch,): the implicit reward margin
    without β, which the DPO family's losses are functions of and β-DPO's statistics and filter read.
    reference_free drops the reference term (a uniform reference)."""
    h = policy_chosen_logps - policy_rejected_logps
    return h if reference_free else h - (reference_chosen_logps - reference_rejected_logps)


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
        none: 1 for every pair (with ρ > 0 the dropped pairs are then a uniform random subset)
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
    With γ = 1 nothing moves: μ stays 0, the same as m0 = 0.
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


@dataclass(frozen=True)
class LossMode:
    """What the configured loss needs, derived once from config.loss (as torchtune's `is_reference_free`)."""
    sft: bool        # loss=sft: the negative log-likelihood of the chosen responses
    beta_dpo: bool   # loss.mode_loss=beta_DPO: batch-level β and the β-guided filter
    loss_type: Optional[str] = None   # loss.loss_type: sigmoid (DPO), hinge (SLiC) or ipo (loss=ipo); None for SFT
    step_scope: bool = False          # loss.beta_dpo_scope=step: β-DPO decides once per optimizer step
    average_log_prob: bool = False    # loss.average_log_prob: responses scored by their mean token log-prob

    @property
    def uses_reference_model(self) -> bool:
        return not self.sft

    @classmethod
    def from_config(cls, loss_config: DictConfig) -> 'LossMode':
        sft = loss_config.name == 'sft'
        if sft:
            return cls(sft=True, beta_dpo=False)
        beta_dpo = loss_config.mode_loss == 'beta_DPO'
        return cls(sft=False, beta_dpo=beta_dpo, loss_type=loss_config.loss_type,
                   step_scope=beta_dpo and loss_config.beta_dpo_scope == 'step',
                   average_log_prob=loss_config.average_log_prob)


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss or gradient norm."""


class BasicTrainer(TrainerCheckpointing):
    """SFT or preference training (DPO, cDPO, IPO, β-DPO) in one process.

    With several GPUs the model is split across them (models.build_models loads it with device_map='balanced'):
    N times the memory, no parallel compute. The trainer keeps the loop, the step, the loss and its metrics, and
    evaluation; β-DPO's state is `BetaDPO`, the reference log-probabilities come from
    `reference_cache.ReferenceLogps`, the policy's from `logps`, samples from `generation`, and what is saved
    to and restored from the run directory from `checkpoints.TrainerCheckpointing`. Subclasses change how the
    model is placed and how state is gathered, through small hooks: `checkpoint_activations`, `clip_gradient`,
    `policy_state_dict`, `optimizer_state_dict`, `load_optimizer_state_dict`.
    """

    def __init__(self, policy: nn.Module, config: DictConfig, seed: int, run_dir: str,
                 reference_model: Optional[nn.Module] = None, rank: int = 0, world_size: int = 1,
                 wandb_run=None, device: Optional[torch.device] = None):
        self.config = config
        self.seed = seed
        self.run_dir = Path(run_dir)
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.device = device if device is not None else first_device(policy)
        # Data parallelism: which slice of each batch this process computes. Tensor parallel ranks
        # all see the whole batch (see TensorParallelTrainer).
        self.dp_rank, self.dp_size = rank, world_size
        self.wandb = wandb_run or DummyWandb()
        self.mode = LossMode.from_config(config.loss)

        self.policy = policy
        if config.activation_checkpointing:
            self.checkpoint_activations()
        if config.compile_policy:
            # nn.Module.compile compiles in place: the class and the state dict's keys stay as they are.
            self.policy.compile()
        self.lora = lora_enabled(config)
        self.reference = ReferenceLogps.of_run(self.policy, reference_model, self.concatenated_forward,
                                               lora=self.lora and self.mode.uses_reference_model)
        self.tokenizer = load_tokenizer(config)
        self.beta_dpo = BetaDPO(config.loss, seed, self.device)

        # examples and optimizer steps so far, batches skipped (on_nonfinite=skip), the last evaluation's step
        self.example_counter = self.batch_counter = self.skipped_batches = 0
        self.last_eval_example = None

        self.data_kwargs = batch_iterator_kwargs(config, self.tokenizer, sft_mode=self.mode.sft, silent=not self.is_main)
        self.eval_batches = list(get_batch_iterator(**self.data_kwargs, split='test', n_examples=config.n_eval_examples,
                                                    batch_size=config.eval_batch_size, seed=seed))
        rank0_print(f'Loaded {len(self.eval_batches)} eval batches of size {config.eval_batch_size}')

    def checkpoint_activations(self) -> None:
        """activation_checkpointing=true: each transformer block of the policy keeps only its input and
        recomputes its activations in the backward pass, through the model's own checkpointing (non-reentrant
        torch.utils.checkpoint, which needs no input that requires a gradient)."""
        enable_activation_checkpointing(self.policy)

    # ----- the training loop ---------------------------------------------------------------------------

    def train(self) -> None:
        """Train for n_epochs / n_examples: evaluate and save every eval_every examples, log each step."""
        self.start()
        last_log = None
        progress = tqdm.tqdm(total=self.config.n_examples, initial=self.example_counter, unit='ex',
                             desc='Training', disable=not self.is_main, dynamic_ncols=True)
        with StopRequest() as stop, progress:
            for batch in self.train_batches():
                if self.eval_due():
                    self.evaluate_and_save()
                metrics = self.train_step(batch)
                progress.update(self.config.batch_size)
                if last_log is None or time.time() - last_log > self.config.minimum_log_interval_secs:
                    self.log(metrics, split='train')
                    last_log = time.time()
                if any_process(stop.signal_name is not None, self.device):
                    self.save_before_stopping(stop.signal_name or 'a signal to another process')
                    return
        self.finish()

    def start(self) -> None:
        """Before the first step: optimizer, seeds, a resumed run's state, the reference pass if precomputed."""
        self.setup_optimization()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        if self.config.resume_from:
            self.restore(Path(self.config.resume_from) / 'LATEST')
        if self.mode.uses_reference_model and self.config.precompute_ref_log_probs:
            self.precompute_reference_logps()

    def finish(self) -> None:
        """After the last step: the final evaluation and checkpoint (unless just done), and the export."""
        if self.last_eval_example != self.example_counter:
            self.evaluate_and_save()
        self.export_pretrained(self.run_dir / 'hf_model')

    def save_before_stopping(self, signal_name: str) -> None:
        """The checkpoint of a run stopped by SIGTERM / SIGINT, with the evaluation if one is due at this
        step (so the resumed run, which does not repeat it, logs exactly what an uninterrupted run logs)."""
        if self.eval_due():
            self.evaluate_and_save()
        else:
            self.save()
        rank0_print(f'Stopped by {signal_name} after {self.example_counter} examples. '
                    f'Resume with:  python train.py <the same arguments> resume_from={self.run_dir}')

    def train_batches(self):
        """The training stream, from the current position (0, or where a resumed run stopped)."""
        return get_batch_iterator(**self.data_kwargs, split='train', n_epochs=self.config.n_epochs,
                                  n_examples=self.config.n_examples, batch_size=self.config.batch_size,
                                  seed=self.seed, start_example=self.example_counter,
                                  bucket_batches=self.config.length_bucket_batches)

    def microbatches(self, batch: Dict) -> List[Dict]:
        """`batch` cut into gradient_accumulation_steps microbatches, still on the CPU and whole over ranks."""
        accumulation = self.config.gradient_accumulation_steps
        return [slice_and_move_batch_for_device(batch, i, accumulation, 'cpu') for i in range(accumulation)]

    def local(self, batch: Dict) -> Dict:
        """This process's data-parallel slice of `batch`, on its device."""
        return slice_and_move_batch_for_device(batch, self.dp_rank, self.dp_size, self.device)

    def eval_due(self) -> bool:
        if self.example_counter % self.config.eval_every != 0 or self.last_eval_example == self.example_counter:
            return False
        return self.example_counter > 0 or self.config.do_first_eval

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer step over `batch`, accumulated over gradient_accumulation_steps microbatches."""
        self.policy.train()
        start_time = time.time()
        microbatches = self.microbatches(batch)
        metrics = defaultdict(list)
        losses = []
        stats_before = self.beta_dpo.margin_stats.state_dict()
        decision = self.step_beta_dpo(microbatches) if self.mode.step_scope else None
        if decision is not None:
            extend_metrics(metrics, {f'record_train/{k}': v for k, v in decision.metrics.items()})
        offset = 0  # of the microbatch's first pair among the step's (for the step's β-DPO decision)
        for index, microbatch in enumerate(microbatches):
            loss, microbatch_metrics = self.get_batch_metrics(self.local(microbatch), train=True,
                                                              step_decision=decision, step_offset=offset)
            offset += len(microbatch['prompt'])
            with self.no_sync_unless(index == len(microbatches) - 1):
                (loss / len(microbatches)).backward()
            losses.append(loss.detach())
            extend_metrics(metrics, microbatch_metrics)

        grad_norm = self.clip_gradient()
        locally_finite = bool(torch.isfinite(torch.stack(losses)).all()) and math.isfinite(grad_norm)
        if not any_process(not locally_finite, self.device):
            self.optimizer.step()
        else:
            self.handle_nonfinite(batch, losses, grad_norm)
            # a skipped batch leaves no trace in β-DPO's statistics
            self.beta_dpo.margin_stats.load_state_dict(stats_before)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.batch_counter += 1
        self.example_counter += self.config.batch_size
        return {**mean_metrics(metrics),
                'examples_per_second': self.config.batch_size / (time.time() - start_time),
                'grad_norm': grad_norm, 'lr': self.scheduler.get_last_lr()[0],
                'padding/fraction': padding_fraction(batch)}

    def no_sync_unless(self, last: bool):
        """The context of a microbatch's backward pass; `last`: the step's last microbatch. Nothing in one process."""
        return contextlib.nullcontext()

    def handle_nonfinite(self, batch: Dict, losses: List[torch.Tensor], grad_norm: float) -> None:
        """Stop with a message naming the step and the batch, or skip the batch (on_nonfinite=skip)."""
        first, last = self.example_counter, self.example_counter + self.config.batch_size - 1
        where = (f'training step {self.batch_counter + 1} (examples {first}–{last} of the training stream; '
                 f'first prompt: {batch["prompt"][0][:80]!r})')
        what = f'loss {[round(l.item(), 4) for l in losses]}, gradient norm {grad_norm}'
        if self.config.on_nonfinite == 'skip':
            self.skipped_batches += 1
            rank0_print(f'Skipping {where}: non-finite {what} ({self.skipped_batches} skipped so far)')
            return
        raise NonFiniteLossError(
            f'Non-finite {what} at {where}. {kept_checkpoint(self.run_dir)}. Lower lr, check the data of this batch, '
            f'or pass on_nonfinite=skip to skip such batches.')

    # ----- forward passes -----------------------------------------------------------------------------

    def concatenated_forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the chosen and rejected responses from one forward pass over both."""
        return concatenated_logps(model, batch, self.config.logps_chunk_size, self.mode.average_log_prob)

    def precompute_reference_logps(self) -> None:
        """The reference pass of precompute_ref_log_probs (reference_cache.ReferenceLogps.precompute). Collective."""
        self.reference.precompute(self.reference_pass_batches(), self.reference_cache_file(), self.local, self.gather,
                                  self.is_main, self.config.precompute_save_every_secs)

    def reference_cache_file(self) -> Path:
        """The file of precompute_ref_log_probs for this model, data, precision and trainer layout."""
        return reference_cache_path(self.config, self.tokenizer, self.world_size, self.device.type)

    def reference_pass_batches(self) -> Iterator[Dict]:
        """The batches of the reference pass (reference_cache.reference_pass_batches), whole over ranks."""
        return reference_pass_batches(self.train_batches(), self.microbatches, self.eval_batches)

    def policy_autocast(self):
        """torch.autocast in policy_autocast's dtype on a GPU; nothing elsewhere (CPU autocast is slower)."""
        if self.config.policy_autocast is None or self.device.type != 'cuda':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.config.policy_autocast))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every data-parallel process, concatenated in rank order (detached)."""
        return all_gather_if_needed(values.detach(), self.dp_rank, self.dp_size)

    # ----- the loss and its metrics -------------------------------------------------------------------

    def get_batch_metrics(self, batch: Dict, train: bool = True, step_decision: Optional[BetaDPOBatch] = None,
                          step_offset: int = 0) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """The loss of this process's microbatch (to backpropagate) and its metrics (lists over all ranks).

        step_decision, step_offset: β-DPO's decision for the whole optimizer step and the index of this microbatch's
        first pair in it (loss.beta_dpo_scope=step, see `step_beta_dpo`); without it β-DPO decides from this one.
        """
        if self.mode.sft:
            return self.sft_metrics(batch, train)
        split = 'train' if train else 'eval'
        loss_config = self.config.loss
        with self.policy_autocast():
            policy_chosen_logps, policy_rejected_logps = self.concatenated_forward(self.policy, batch)
        reference_chosen_logps, reference_rejected_logps = self.reference(batch)
        # The implicit reward margin with the reference term even when reference_free drops it from the loss:
        # β-DPO's statistics, filter and β read it so (the original's A_gap), and the rewards are logged so.
        margins = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps).detach()
        beta, metrics = loss_config.beta, {}
        if self.mode.beta_dpo:
            n_local = margins.shape[0]
            if step_decision is None:
                decision, offset, scale = self.beta_dpo.decide(self.gather(margins), train), self.dp_rank * n_local, 1
                metrics.update({f'record_{split}/{k}': v for k, v in decision.metrics.items()})
            else:
                decision, offset = step_decision, step_offset + self.dp_rank * n_local
                scale = self.config.gradient_accumulation_steps
            beta = decision.betas[offset:offset + n_local].to(margins.device)
            local_keep = decision.keep[offset:offset + n_local].to(margins.device).float()

        losses, _, _ = preference_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=beta, label_smoothing=loss_config.label_smoothing, reference_free=loss_config.reference_free,
            loss_type=self.mode.loss_type)
        if loss_config.rpo_alpha:
            counts = (batch['chosen_labels'][:, 1:] != -100).sum(-1)  # labelled tokens; 1 for mean log-probs
            nll = chosen_nll(policy_chosen_logps, torch.ones_like(counts) if self.mode.average_log_prob else counts)
            losses = losses + loss_config.rpo_alpha * nll
            metrics[f'rpo_{split}/chosen_nll'] = self.gather(nll)
        # log π − log π_ref of every pair of the whole batch, from which the rewards are logged
        chosen_logratios = self.gather(policy_chosen_logps - reference_chosen_logps)
        rejected_logratios = self.gather(policy_rejected_logps - reference_rejected_logps)
        if self.mode.beta_dpo:
            # The mean over the kept pairs of the whole batch across ranks (and, at scope=step, across the
            # step's microbatches, whose losses train_step averages: hence the factor `scale`). Data-parallel
            # gradients are averaged over dp_size ranks, hence the factor dp_size (β-DPO's original divided
            # by each rank's own kept count, weighting pairs unequally).
            loss = (losses * local_keep).sum() * self.dp_size * scale / int(decision.keep.sum())
            # what the step optimizes, beside the original's loss/{split} (every pair's loss, kept or not)
            metrics[f'loss/{split}_kept'] = self.gather(loss.detach().reshape(1) / self.dp_size).sum().reshape(1)
            metrics.update(reward_metrics(chosen_logratios, rejected_logratios, self.gather(beta), split,
                                          suffix='_beta_used'))
        else:
            loss = losses.mean()

        metrics.update({
            # as the original: the rewards with the configured β0 (β-DPO's β_used versions are *_beta_used)
            **reward_metrics(chosen_logratios, rejected_logratios, loss_config.beta, split),
            f'rewards_{split}/accuracies': (chosen_logratios > rejected_logratios).float(),
            # the margin without β: comparable between runs of different β
            f'rewards_{split}/logratio_margins': self.gather(margins),
            f'logps_{split}/chosen': self.gather(policy_chosen_logps),
            f'logps_{split}/rejected': self.gather(policy_rejected_logps),
            # as the original: the loss of every pair (with β-DPO's β_used), whether the filter kept it or not
            f'loss/{split}': self.gather(losses.detach()),
        })
        return loss, {k: (v.float().cpu().tolist() if torch.is_tensor(v) else v) for k, v in metrics.items()}

    def sft_metrics(self, batch: Dict, train: bool) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """SFT: the mean negative log-likelihood of the chosen responses, and its metrics."""
        split = 'train' if train else 'eval'
        with self.policy_autocast():
            policy_chosen_logps = forward_logps(self.policy, batch['chosen_input_ids'], batch['chosen_attention_mask'],
                                                batch['chosen_labels'], self.config.logps_chunk_size)
        loss = -policy_chosen_logps.mean()
        metrics = {f'logps_{split}/chosen': self.gather(policy_chosen_logps),
                   f'loss/{split}': self.gather(loss.reshape(1))}
        return loss, {k: v.float().cpu().tolist() for k, v in metrics.items()}

    def step_beta_dpo(self, microbatches: List[Dict]) -> BetaDPOBatch:
        """β-DPO's decision over a whole optimizer step (loss.beta_dpo_scope=step), before any backward pass.

        Every microbatch's margins are computed without gradients first (one more forward pass of the policy, and
        of the reference unless precomputed) and gathered over all ranks: in microbatch order they are the batch's
        margins in its own row order, so the statistics update, β and the kept pairs are those of a run without
        gradient accumulation. Keeping the microbatches' graphs instead would need the memory accumulation saves.
        """
        margins = []
        with torch.no_grad():
            for microbatch in microbatches:
                local = self.local(microbatch)
                with self.policy_autocast():
                    policy_logps = self.concatenated_forward(self.policy, local)
                # with the reference term whatever loss.reference_free says, as in get_batch_metrics
                margins.append(self.gather(logratio_margins(*policy_logps, *self.reference(local))))
        return self.beta_dpo.decide(torch.cat(margins), train=True)

    # ----- evaluation ---------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        """Mean metrics over the evaluation set (and samples, if sample_during_eval)."""
        self.policy.eval()
        self.beta_dpo.start_evaluation(self.seed + self.example_counter)
        all_metrics = defaultdict(list)
        for eval_batch in tqdm.tqdm(self.eval_batches, desc='Computing eval metrics', disable=not self.is_main,
                                    leave=False):
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(self.local(eval_batch), train=False)
            extend_metrics(all_metrics, metrics)
        mean = mean_metrics(all_metrics)
        if self.gold_eval_enabled():
            mean.update(self.gold_eval())
        if self.config.sample_during_eval:
            self.log_samples()
        return mean

    def gold_eval_enabled(self) -> bool:
        """Whether evaluation scores greedy answers against the synthetic task's gold answers."""
        return 'synthetic' in self.config.datasets and self.config.synthetic.n_gold_eval > 0

    def gold_eval(self) -> Dict[str, float]:
        """{'gold_eval/accuracy': the fraction of the first synthetic.n_gold_eval test prompts (in order, whole eval
        batches) that greedy generation answers exactly right} (synthetic_task.gold_eval_accuracy). Each rank
        generates for its slice of a batch and `generate` gathers the answers: every rank returns the same value."""
        batches = get_batch_iterator(**{**self.data_kwargs, 'names': ['synthetic'], 'shuffle': False,
                                        'sft_mode': True, 'silent': True},
                                     split='test', n_epochs=1, n_examples=self.config.synthetic.n_gold_eval,
                                     batch_size=self.config.eval_batch_size, seed=self.seed)
        return {'gold_eval/accuracy': gold_eval_accuracy(
            batches, lambda batch: self.generate(self.policy, self.local(batch), do_sample=False))}

    def log_samples(self) -> None:
        """Sample from the policy (and the reference) on the first eval prompts and print / log them
        (generation.draw_samples, seeded by the step)."""
        def reference_samples(batch: Dict) -> List[str]:
            with self.reference.active():
                return self.generate(self.reference.model, self.local(batch))

        samplers = {'policy_samples': lambda batch: self.generate(self.policy, self.local(batch))}
        if self.reference.model is not None:
            samplers['reference_samples'] = reference_samples
        n_batches = max(1, self.config.n_eval_model_samples // self.config.eval_batch_size)
        prompts, samples = draw_samples(self.eval_batches[:n_batches], samplers, self.seed + self.example_counter)
        print_samples(samples)
        if self.is_main:
            log_sample_tables(self.wandb, self.example_counter, prompts, samples)

    def generate(self, model: nn.Module, batch: Dict, do_sample: bool = True) -> List[str]:
        """Decoded continuations (prompt included) of the batch's prompts, gathered from all ranks."""
        return generate_texts(model, self.tokenizer, batch, self.config.max_length, do_sample, self.dp_rank, self.dp_size)

    def evaluate_and_save(self) -> None:
        rank0_print(f'Running evaluation after {self.example_counter} train examples')
        metrics = self.evaluate()
        self.last_eval_example = self.example_counter
        self.log(metrics, split='eval')
        if self.example_counter > 0:
            self.save(metrics)

    # ----- logging ------------------------------------------------------------------------------------

    def log(self, metrics: Dict[str, float], split: str) -> None:
        """Print, append to metrics.jsonl and send to wandb (rank 0 only)."""
        if not self.is_main:
            return
        metrics = {**metrics, 'counters/examples': self.example_counter, 'counters/updates': self.batch_counter,
                   **({'counters/skipped_batches': self.skipped_batches} if self.skipped_batches else {})}
        rank0_print(f'{split} stats after {self.example_counter} examples: {formatted_dict(metrics)}')
        self.wandb.log(metrics, step=self.example_counter)
        if not self.config.debug:
            append_metrics(self.run_dir, split, metrics)

    # ----- optimization -------------------------------------------------------------------------------

    def setup_optimization(self) -> None:
        """The optimizer and lr schedule of config (optimization.build_optimizer), over the trained parameters."""
        self.optimizer, self.scheduler = build_optimizer(
            [p for p in self.policy.parameters() if p.requires_grad], self.config, self.total_steps)

    def total_steps(self) -> int:
        return total_training_steps(self.config, self.data_kwargs)

    def clip_gradient(self) -> float:
        """Clip the policy's gradients to max_grad_norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm).item()


class ShardedTrainer(BasicTrainer):
    """What FSDPTrainer and TensorParallelTrainer share: the model is split over the processes.

    The models arrive whole on rank 0 and empty (on the meta device, no memory) on the other ranks
    (models.build_models); each trainer splits them with `split`, then rank 0's weights are broadcast
    into every rank's part. Checkpoints gather the full state dict on rank 0 in BasicTrainer's format
    (policy.pt, and optimizer.pt keyed by parameter position), so an SFT run of any trainer starts a
    β-DPO run of any other.
    """

    def __init__(self, policy: nn.Module, config: DictConfig, seed: int, run_dir: str,
                 reference_model: Optional[nn.Module] = None, rank: int = 0, world_size: int = 1,
                 wandb_run=None, device: Optional[torch.device] = None):
        # What `split` reads, set before BasicTrainer's __init__, which compiles the (then split) policy.
        self.config, self.world_size, self.device = config, world_size, device
        # BasicTrainer's optimizer.pt numbers the parameters in this order; the gathered state names them.
        self.trainable_names = [name for name, p in policy.named_parameters() if p.requires_grad]
        policy = split_and_load(policy, lambda model: self.split(model, reference=False), device)
        if reference_model is not None:
            reference_model = split_and_load(reference_model, lambda model: self.split(model, reference=True), device)
        super().__init__(policy, config, seed, run_dir, reference_model=reference_model, rank=rank,
                         world_size=world_size, wandb_run=wandb_run, device=device)

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        """`model` split over the processes (in place); `reference` for the frozen reference model."""
        raise NotImplementedError

    def checkpoint_activations(self) -> None:
        """Nothing: `split` has already wrapped the policy's blocks (FSDP must shard the wrappers)."""

    def clip_gradient(self) -> float:
        return clip_grad_norm(self.policy.parameters(), self.config.max_grad_norm, self.device)

    def policy_state_dict(self, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
        return gathered_model_state(self.policy, trainable_only)

    def optimizer_state_dict(self) -> Dict:
        return gathered_optimizer_state(self.policy, self.optimizer, self.trainable_names)

    def load_optimizer_state_dict(self, state: Dict) -> None:
        load_gathered_optimizer_state(self.policy, self.optimizer, state, self.trainable_names)


class FSDPTrainer(ShardedTrainer):
    """Fully sharded data parallel (PyTorch's FSDP2, `fully_shard`): each process holds 1/N of the
    parameters, gradients and optimizer state, and computes 1/N of each batch (distributed.fsdp_split).

    model.fsdp_policy_mp=bfloat16 computes in bfloat16 and reduces gradients in float32 while the sharded
    parameters and the optimizer stay in model.policy_dtype; activation_checkpointing=true recomputes each
    block's activations in the backward pass.
    """

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        return fsdp_split(model, self.config, reference)

    @contextlib.contextmanager
    def no_sync_unless(self, last: bool):
        """Gradients reduce-scattered after the step's last microbatch only (FSDP2's set_requires_gradient_sync):
        before it, each rank accumulates them unsharded, one reduce-scatter per step instead of one per microbatch."""
        self.policy.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.policy.set_requires_gradient_sync(True)


class TensorParallelTrainer(ShardedTrainer):
    """Tensor parallel (`torch.distributed.tensor.parallel`): every weight matrix of the attention and
    MLP layers is split over the processes, which all compute the same batch together
    (distributed.tensor_parallel_split).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every rank computes the whole batch; there is no data-parallel split.
        self.dp_rank, self.dp_size = 0, 1

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        return tensor_parallel_split(model, self.config, self.world_size, self.device, reference)


def reward_metrics(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: Union[float, torch.Tensor],
                   split: str, suffix: str = '') -> Dict[str, torch.Tensor]:
    """rewards_{split}/{chosen,rejected,margins}{suffix}: the implicit rewards β·(log π − log π_ref) of each pair
    (shape (N,)) and their differences, with this β."""
    beta = beta.detach() if torch.is_tensor(beta) else beta
    return {f'rewards_{split}/chosen{suffix}': beta * chosen_logratios,
            f'rewards_{split}/rejected{suffix}': beta * rejected_logratios,
            f'rewards_{split}/margins{suffix}': beta * (chosen_logratios - rejected_logratios)}
