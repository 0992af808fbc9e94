"""Loss functions and trainers for SFT, DPO, IPO, conservative DPO and β-DPO.

The loss functions come first; they are pure functions of tensors (no communication, no config, no
hidden randomness), so they can be read and tested on their own:

    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta=0.1)
    stats = MarginStats(device)                 # β-DPO running margin statistics
    stats.update(margins)                       # training microbatches only
    beta_used, keep = dynamic_beta(margins, stats.mean, stats.std, beta=0.1, a=0.6,
                                   mode_weight=0.2, generator=torch.Generator().manual_seed(0))

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
"""
import contextlib
import inspect
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import tqdm
from omegaconf import DictConfig

from checkpoints import (DiskFullError, append_metrics, clean_run_dir_for_resume, export_hf_model, how_to_continue,
                         kept_checkpoint, load_training_state, optimizer_state_by_index, optimizer_state_by_name,
                         save_checkpoint, with_own_implementation)
from distributed import (all_gather_if_needed, any_process, barrier, clip_grad_norm, fsdp_split, full_state_dict_options,
                         split_and_load, tensor_parallel_split)
from logps import forward_logps
from models import first_device, load_tokenizer, unwrap
from preference_datasets import dataset_options, get_batch_iterator, padding_fraction
from reference_cache import ReferenceLogps, reference_cache_path
from synthetic_task import synthetic_gold_accuracy
from utils import (DummyWandb, StopRequest, formatted_dict, get_local_dir, pad_to_length, rank0_print,
                   slice_and_move_batch_for_device)

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
    h = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                         reference_free)

    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)

    beta_for_rewards = beta.detach() if torch.is_tensor(beta) else beta
    chosen_rewards = beta_for_rewards * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta_for_rewards * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


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


def concatenated_inputs(batch: Dict[str, Union[List, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Chosen and rejected tensors stacked into one batch of 2·B rows (chosen first), padded alike.

    One forward pass over both halves is faster than two, and under FSDP it gathers each shard once.
    """
    max_length = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
    concatenated = {}
    for suffix, pad_value in (('input_ids', 0), ('attention_mask', 0), ('labels', -100)):
        concatenated[f'concatenated_{suffix}'] = torch.cat([
            pad_to_length(batch[f'chosen_{suffix}'], max_length, pad_value),
            pad_to_length(batch[f'rejected_{suffix}'], max_length, pad_value),
        ], dim=0)
    return concatenated


@dataclass(frozen=True)
class LossMode:
    """What the configured loss needs, derived once from config.loss (as torchtune's `is_reference_free`)."""
    sft: bool        # loss=sft: the negative log-likelihood of the chosen responses
    ipo: bool        # loss=ipo: IPO's squared loss instead of DPO's sigmoid
    beta_dpo: bool   # loss.mode_loss=beta_DPO: batch-level β and the β-guided filter

    @property
    def uses_reference_model(self) -> bool:
        return not self.sft

    @classmethod
    def from_config(cls, loss_config: DictConfig) -> 'LossMode':
        sft = loss_config.name == 'sft'
        return cls(sft=sft, ipo=loss_config.name == 'ipo', beta_dpo=not sft and loss_config.mode_loss == 'beta_DPO')


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss or gradient norm."""


class BasicTrainer:
    """SFT or preference training (DPO, cDPO, IPO, β-DPO) in one process.

    With several GPUs the model is split across them (models.build_models loads it with device_map='balanced'):
    N times the memory, no parallel compute. The trainer keeps the loop, the step, the loss and its metrics, and
    evaluation; the reference log-probabilities come from `reference_cache.ReferenceLogps`, checkpoint files
    from `checkpoints`. Subclasses change how the model is placed and how state is gathered, through small
    hooks: `checkpoint_activations`, `clip_gradient`, `policy_state_dict`, `optimizer_state_dict`,
    `load_optimizer_state_dict`.
    """

    def __init__(self, policy: nn.Module, config: DictConfig, seed: int, run_dir: str,
                 reference_model: Optional[nn.Module] = None, rank: int = 0, world_size: int = 1,
                 wandb_run=None, device: Optional[torch.device] = None):
        self.config = config
        self.seed = seed
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
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
        self.reference = ReferenceLogps(reference_model, self.concatenated_forward)
        self.tokenizer = load_tokenizer(config)
        self.margin_stats = MarginStats(self.device)
        # The β-DPO filter's only randomness: seeded alike on every rank, so all ranks keep the same pairs.
        self.filter_generator = torch.Generator().manual_seed(seed)

        self.example_counter = 0
        self.batch_counter = 0
        self.skipped_batches = 0
        self.last_eval_example = None

        self.data_kwargs = dict(
            names=list(config.datasets), tokenizer=self.tokenizer, shuffle=True, max_length=config.max_length,
            max_prompt_length=config.max_prompt_length, sft_mode=self.mode.sft, silent=not self.is_main,
            cache_dir=get_local_dir(config.local_dirs), dataset_options=dataset_options(config))
        self.eval_batches = list(get_batch_iterator(**self.data_kwargs, split='test', n_examples=config.n_eval_examples,
                                                    batch_size=config.eval_batch_size, seed=seed))
        rank0_print(f'Loaded {len(self.eval_batches)} eval batches of size {config.eval_batch_size}')

    def checkpoint_activations(self) -> None:
        """activation_checkpointing=true: each transformer block of the policy keeps only its input and
        recomputes its activations in the backward pass, through the model's own checkpointing (non-reentrant
        torch.utils.checkpoint, which needs no input that requires a gradient)."""
        unwrap(self.policy).activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})

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
        stats_before = self.margin_stats.state_dict()
        for microbatch in microbatches:
            loss, microbatch_metrics = self.get_batch_metrics(self.local(microbatch), train=True)
            (loss / len(microbatches)).backward()
            losses.append(loss.detach())
            extend_metrics(metrics, microbatch_metrics)

        grad_norm = self.clip_gradient()
        locally_finite = bool(torch.isfinite(torch.stack(losses)).all()) and math.isfinite(grad_norm)
        if not any_process(not locally_finite, self.device):
            self.optimizer.step()
        else:
            self.handle_nonfinite(batch, losses, grad_norm)
            self.margin_stats.load_state_dict(stats_before)  # a skipped batch leaves no trace in β-DPO's statistics
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.batch_counter += 1
        self.example_counter += self.config.batch_size
        return {**mean_metrics(metrics),
                'examples_per_second': self.config.batch_size / (time.time() - start_time),
                'grad_norm': grad_norm, 'lr': self.scheduler.get_last_lr()[0],
                'padding/fraction': padding_fraction(batch)}

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
        concatenated = concatenated_inputs(batch)
        all_logps = forward_logps(model, concatenated['concatenated_input_ids'], concatenated['concatenated_attention_mask'],
                                  concatenated['concatenated_labels'], self.config.logps_chunk_size)
        n = batch['chosen_input_ids'].shape[0]
        return all_logps[:n], all_logps[n:]

    def precompute_reference_logps(self) -> None:
        """The reference pass of precompute_ref_log_probs (reference_cache.ReferenceLogps.precompute). Collective."""
        path = reference_cache_path(self.config, self.tokenizer)
        self.reference.precompute(self.reference_pass_batches(), path, self.local, self.gather, self.is_main,
                                  self.config.precompute_save_every_secs)

    def reference_pass_batches(self):
        """The batches of the reference pass, before the data-parallel split: each training batch's
        gradient_accumulation_steps microbatches, as train_step slices them (so the pass never runs a
        larger forward than training does), then the evaluation batches."""
        for batch in self.train_batches():
            yield from self.microbatches(batch)
        yield from self.eval_batches

    def policy_autocast(self):
        """torch.autocast in policy_autocast's dtype on a GPU; nothing elsewhere (CPU autocast is slower)."""
        if self.config.policy_autocast is None or self.device.type != 'cuda':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.config.policy_autocast))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every data-parallel process, concatenated in rank order (detached)."""
        return all_gather_if_needed(values.detach(), self.dp_rank, self.dp_size)

    # ----- the loss and its metrics -------------------------------------------------------------------

    def get_batch_metrics(self, batch: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """The loss of this process's microbatch (to backpropagate) and its metrics (lists over all ranks)."""
        if self.mode.sft:
            return self.sft_metrics(batch, train)
        split = 'train' if train else 'eval'
        loss_config = self.config.loss
        with self.policy_autocast():
            policy_chosen_logps, policy_rejected_logps = self.concatenated_forward(self.policy, batch)
        reference_chosen_logps, reference_rejected_logps = self.reference(batch)
        margins = logratio_margins(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, loss_config.reference_free).detach()
        beta, metrics = loss_config.beta, {}
        if self.mode.beta_dpo:
            beta, local_keep, batch_metrics = self.beta_dpo_filter(margins, train)
            metrics.update({f'record_{split}/{k}': v for k, v in batch_metrics.items()})

        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=beta, label_smoothing=loss_config.label_smoothing, ipo=self.mode.ipo,
            reference_free=loss_config.reference_free)
        if self.mode.beta_dpo:
            # The mean over the kept pairs of the whole batch across ranks. Data-parallel gradients are
            # averaged over dp_size ranks, hence the factor dp_size (β-DPO's original divided by each
            # rank's own kept count, weighting pairs unequally).
            loss = (losses * local_keep).sum() * self.dp_size / batch_metrics['mask_count'][0]
        else:
            loss = losses.mean()

        metrics.update({
            f'rewards_{split}/chosen': self.gather(chosen_rewards),
            f'rewards_{split}/rejected': self.gather(rejected_rewards),
            f'rewards_{split}/accuracies': self.gather((chosen_rewards > rejected_rewards).float()),
            f'rewards_{split}/margins': self.gather(chosen_rewards - rejected_rewards),
            # the margin without β: comparable between runs of different β and across β-DPO's batches,
            # whose rewards are scaled by each batch's own β
            f'rewards_{split}/logratio_margins': self.gather(margins),
            f'logps_{split}/chosen': self.gather(policy_chosen_logps),
            f'logps_{split}/rejected': self.gather(policy_rejected_logps),
            f'loss/{split}': self.gather(loss.detach().reshape(1) / self.dp_size).sum().reshape(1),
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

    def beta_dpo_filter(self, margins: torch.Tensor, train: bool):
        """β-DPO for one microbatch from this rank's (B,) margins: (β_used, this rank's keep mask as floats, metrics).

        The margins of the whole microbatch are gathered from all ranks (`batch_beta_and_mask`).
        """
        beta_used, keep = self.batch_beta_and_mask(self.gather(margins), train)
        n_local = margins.shape[0]
        local_keep = keep[self.dp_rank * n_local:(self.dp_rank + 1) * n_local].to(margins.device).float()
        metrics = {'beta_used': [beta_used.item()], 'mask_count': [int(keep.sum())],
                   'kept_fraction': [keep.float().mean().item()],
                   'gap_mean': [self.margin_stats.mean.item()], 'gap_std': [self.margin_stats.std.item()]}
        return beta_used.to(margins.device), local_keep, metrics

    def batch_beta_and_mask(self, margins: torch.Tensor, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """β and the keep mask of the whole microbatch from its (N,) margins gathered over all ranks.

        The running statistics are updated in training only, before dynamic_beta reads them (the reference
        implementation's order). Identical on every rank by construction: the same margins, the same
        statistics, and a generator seeded alike everywhere that nothing else draws from. Evaluation draws
        from its own generator so it never shifts the training stream's draws.
        """
        loss_config = self.config.loss
        if train:
            self.margin_stats.update(margins)
            generator = self.filter_generator
        else:
            generator = torch.Generator().manual_seed(self.seed + self.example_counter)
        return dynamic_beta(margins, self.margin_stats.mean, self.margin_stats.std, loss_config.beta, loss_config.a,
                            loss_config.mode_weight, generator=generator)

    # ----- evaluation ---------------------------------------------------------------------------------

    def evaluate(self) -> Dict[str, float]:
        """Mean metrics over the evaluation set (and samples, if sample_during_eval)."""
        self.policy.eval()
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
        """{'gold_eval/accuracy': fraction of held-out synthetic prompts answered exactly right}.

        Greedy generation from the policy on the first `synthetic.n_gold_eval` test prompts (in the
        split's order, so every evaluation and every run scores the same prompts; rounded up to whole
        eval batches, at most the whole test split). Each data-parallel rank generates for its slice of a
        batch and `generate` gathers the answers, so every rank returns the same value.
        """
        batches = get_batch_iterator(**{**self.data_kwargs, 'names': ['synthetic'], 'shuffle': False,
                                        'sft_mode': True, 'silent': True},
                                     split='test', n_epochs=1, n_examples=self.config.synthetic.n_gold_eval,
                                     batch_size=self.config.eval_batch_size, seed=self.seed)
        prompts, completions = [], []
        for batch in batches:
            texts = self.generate(self.policy, self.local(batch), do_sample=False)
            prompts.extend(batch['prompt'])
            # generate() decodes prompt + continuation; EOS and padding are skipped special tokens
            completions.extend(text[len(prompt):] if text.startswith(prompt) else None
                               for prompt, text in zip(batch['prompt'], texts))
        return {'gold_eval/accuracy': synthetic_gold_accuracy(prompts, completions)}

    def log_samples(self) -> None:
        """Sample from the policy (and the reference) on the first eval prompts and print / log them."""
        n_batches = max(1, self.config.n_eval_model_samples // self.config.eval_batch_size)
        policy_samples, reference_samples, prompts = [], [], []
        # Sampling draws from the global RNG; fork it so evaluation never changes the training stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.example_counter)
            for eval_batch in self.eval_batches[:n_batches]:
                local_batch = self.local(eval_batch)
                prompts.extend(eval_batch['prompt'])
                policy_samples.extend(self.generate(self.policy, local_batch))
                if self.reference.model is not None:
                    reference_samples.extend(self.generate(self.reference.model, local_batch))
        rank0_print('policy samples:\n' + json.dumps(policy_samples[:4], indent=2))
        if reference_samples:
            rank0_print('reference samples:\n' + json.dumps(reference_samples[:4], indent=2))
        if self.is_main:
            log_sample_tables(self.wandb, self.example_counter, prompts,
                              {'policy_samples': policy_samples, 'reference_samples': reference_samples})

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
        metrics = dict(metrics)
        metrics['counters/examples'] = self.example_counter
        metrics['counters/updates'] = self.batch_counter
        if self.skipped_batches:
            metrics['counters/skipped_batches'] = self.skipped_batches
        if not self.is_main:
            return
        rank0_print(f'{split} stats after {self.example_counter} examples: {formatted_dict(metrics)}')
        self.wandb.log(metrics, step=self.example_counter)
        if not self.config.debug:
            append_metrics(self.run_dir, split, metrics)

    # ----- optimization -------------------------------------------------------------------------------

    def setup_optimization(self) -> None:
        """The optimizer named by config.optimizer and the linear warmup schedule."""
        optimizer_class = getattr(torch.optim, self.config.optimizer)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        kwargs = {'fused': True} if fused_optimizer_applies(optimizer_class, params) else {}
        self.optimizer = optimizer_class(params, lr=self.config.lr, **kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lambda step: min(1.0, (step + 1) / (self.config.warmup_steps + 1)))

    def clip_gradient(self) -> float:
        """Clip the policy's gradients to max_grad_norm; returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm).item()

    # ----- checkpoints (the files: checkpoints.py) -----------------------------------------------------

    def policy_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full policy state dict on rank 0 (None elsewhere); collective in sharded subclasses."""
        return self.policy.state_dict()

    def optimizer_state_dict(self) -> Optional[Dict]:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(with_own_implementation(self.optimizer, state))

    def trainer_state(self) -> Dict:
        """What a resumed run needs besides weights and optimizer: counters, β-DPO statistics, RNG states."""
        return {'example_counter': self.example_counter, 'batch_counter': self.batch_counter,
                'skipped_batches': self.skipped_batches, 'last_eval_example': self.last_eval_example,
                'margin_stats': self.margin_stats.state_dict(),
                'filter_generator': self.filter_generator.get_state(), 'torch_rng': torch.get_rng_state()}

    def save(self, metrics: Optional[Dict] = None) -> None:
        """RUN_DIR/step-N/ and LATEST (checkpoints.save_checkpoint); no-op in debug mode. Collective."""
        if self.config.debug:
            rank0_print('skipping save in debug mode')
            return
        policy_state = self.policy_state_dict()
        optimizer_state = self.optimizer_state_dict()
        if self.is_main:
            try:
                step_dir = save_checkpoint(self.run_dir, self.example_counter, metrics or {}, policy=policy_state,
                                           optimizer=optimizer_state, scheduler=self.scheduler.state_dict(),
                                           trainer_state=self.trainer_state())
            except DiskFullError as e:
                raise DiskFullError(f'{e}\nFree some space there (or move the run to a larger disk). '
                                    f'{how_to_continue(self.run_dir)}') from None
            rank0_print(f'saved checkpoint {step_dir}')
        barrier()

    def restore(self, checkpoint_dir: Path) -> None:
        """Continue from `checkpoint_dir` (a resume): optimizer, scheduler, counters, statistics, RNGs.

        The policy weights were loaded by models.build_models before the model was wrapped.
        """
        saved = load_training_state(checkpoint_dir)
        self.load_optimizer_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        state = saved.trainer_state
        self.example_counter = state['example_counter']
        self.batch_counter = state['batch_counter']
        self.skipped_batches = state['skipped_batches']
        self.margin_stats.load_state_dict(state['margin_stats'])
        self.filter_generator.set_state(state['filter_generator'])
        torch.set_rng_state(state['torch_rng'])
        self.last_eval_example = state['last_eval_example']
        if self.is_main:
            clean_run_dir_for_resume(self.run_dir, self.example_counter)
        rank0_print(f'Resumed from {checkpoint_dir.resolve()} at {self.example_counter} examples')

    def export_pretrained(self, output_dir: Path) -> None:
        """Save the policy in Hugging Face format (checkpoints.export_hf_model). Collective."""
        if self.config.debug:
            return
        state = self.policy_state_dict()
        if self.is_main:
            export_hf_model(unwrap(self.policy), state, self.tokenizer, output_dir)
            rank0_print(f'exported the policy in Hugging Face format to {output_dir}')
        barrier()


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

    def policy_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(self.policy, options=full_state_dict_options())
        return state if self.is_main else None

    def optimizer_state_dict(self) -> Optional[Dict]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(self.policy, self.optimizer, options=full_state_dict_options())
        return optimizer_state_by_index(state, self.trainable_names) if self.is_main else None

    def load_optimizer_state_dict(self, state: Dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        state = with_own_implementation(self.optimizer, state)
        if not state['state']:
            # A stateless optimizer (SGD without momentum): only the hyperparameters, which every rank has whole.
            # set_optimizer_state_dict fails on it (torch 2.13: AssertionError 'Expected device to be set').
            self.optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(self.policy, self.optimizer, optimizer_state_by_name(state, self.trainable_names),
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


class FSDPTrainer(ShardedTrainer):
    """Fully sharded data parallel (PyTorch's FSDP2, `fully_shard`): each process holds 1/N of the
    parameters, gradients and optimizer state, and computes 1/N of each batch (distributed.fsdp_split).

    model.fsdp_policy_mp=bfloat16 computes in bfloat16 and reduces gradients in float32 while the sharded
    parameters and the optimizer stay in model.policy_dtype; activation_checkpointing=true recomputes each
    block's activations in the backward pass.
    """

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        return fsdp_split(model, self.config, reference)


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


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, batch: Dict, max_length: int, do_sample: bool, dp_rank: int,
                   dp_size: int) -> List[str]:
    """Decoded continuations (prompt included) of a local batch's prompts, gathered from all data-parallel ranks."""
    output = model.generate(batch['prompt_input_ids'], attention_mask=batch['prompt_attention_mask'],
                            max_length=max_length, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                            # sharded models: every rank runs each step until all ranks are done
                            synced_gpus=dp_size > 1)
    output = pad_to_length(output, max_length, tokenizer.pad_token_id)
    return tokenizer.batch_decode(all_gather_if_needed(output, dp_rank, dp_size), skip_special_tokens=True)


def log_sample_tables(wandb_run, step: int, prompts: List[str], samples: Dict[str, List[str]]) -> None:
    """One wandb table (step, prompt, sample) per non-empty list of `samples`; nothing without wandb."""
    if isinstance(wandb_run, DummyWandb):
        return
    import wandb
    for name, texts in samples.items():
        if texts:
            table = wandb.Table(columns=['step', 'prompt', 'sample'], data=[[step, p, s] for p, s in zip(prompts, texts)])
            wandb_run.log({name: table}, step=step)


def extend_metrics(into: Dict[str, List[float]], metrics: Dict[str, List[float]]) -> None:
    """Append each list of `metrics` to the list of the same key in `into`."""
    for key, values in metrics.items():
        into[key].extend(values)


def mean_metrics(metrics: Dict[str, List[float]]) -> Dict[str, float]:
    """The mean of each list."""
    return {key: sum(values) / len(values) for key, values in metrics.items()}


def fused_optimizer_applies(optimizer_class: type, params: List[torch.Tensor]) -> bool:
    """Whether to ask `optimizer_class` for its fused kernel (one pass over each parameter instead of
    one per elementwise op: on a 2-core CPU, AdamW over 14M parameters takes 0.06 s instead of 0.56 s).

    PyTorch has fused Adam, AdamW, SGD and Adagrad for CPU and CUDA tensors; sharded (DTensor)
    parameters keep the default multi-tensor path, which every trainer supports.
    """
    accepts_fused = 'fused' in inspect.signature(optimizer_class).parameters
    plain = all(type(p) is nn.Parameter and p.device.type in ('cpu', 'cuda') and p.is_floating_point() for p in params)
    return accepts_fused and plain and len(params) > 0
