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
import hashlib
import inspect
import math
import json
import os
import random
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tqdm
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from models import materialize_model
from preference_datasets import (data_identity, get_batch_iterator, padding_fraction, save_atomically,
                                 synthetic_gold_accuracy, tokenizer_identity)
from utils import (all_gather_if_needed, atomic_checkpoint_dir, atomic_write_text, formatted_dict, get_local_dir,
                   load_checkpoint_file, pad_to_length, point_latest_to, rank0_print,
                   get_block_modules, remove_incomplete_checkpoints, slice_and_move_batch_for_device)

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


class _ChunkedLabelLogps(torch.autograd.Function):
    """log p(y_i | h_i) = (W h_i + b)[y_i] − logsumexp(W h_i + b), a chunk of rows of the (N, V) logits at a time.

    Autograd through a plain loop would keep every chunk's float32 logits and log-softmax alive until the
    backward pass. This Function keeps h, W, b, the targets and the (N,) normalisers, and recomputes each
    chunk's logits in the backward pass: one more matmul per chunk for memory that no longer grows with
    the number of tokens (the trade Liger-Kernel's fused linear cross-entropy makes). When all N rows fit
    in one chunk, the backward pass would allocate that chunk anyway, so the forward keeps its softmax
    instead and the backward needs neither the matmul nor the exponentials again: the same peak, less time.
    All chunks share one float32 buffer updated in place: on CPUs a fresh 100 MB tensor per chunk costs
    more in page faults than the exponentials computed in it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        keep_softmax = n <= chunk_size and any(ctx.needs_input_grad[:3])
        # equal chunks: a last chunk of a few rows would stream the whole weight for little work
        chunk_size = -(-n // -(-n // chunk_size)) if n > 0 else chunk_size
        token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        normalisers = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buffer = torch.empty(min(n, chunk_size), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, bias, buffer)
            target_logits = logits.gather(1, targets[rows, None]).squeeze(1)
            normalisers[rows] = _softmax_and_logsumexp_(logits)
            token_logps[rows] = target_logits - normalisers[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, normalisers, buffer if keep_softmax else None)
        ctx.chunk_size = chunk_size
        ctx.backward_done = False
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        # ∂ log p(y_i) / ∂ logits_i = onehot(y_i) − softmax(logits_i), weighted by the incoming gradient g_i.
        if ctx.backward_done:
            raise RuntimeError('label_logps_from_hidden supports one backward pass per forward (its softmax is '
                               'reused in place)')
        ctx.backward_done = True
        hidden, weight, bias, targets, normalisers, softmax = ctx.saved_tensors
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # float32 accumulators: a bfloat16 weight's gradient summed over thousands of tokens would round away.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        if softmax is None:
            buffer = torch.empty(min(n, ctx.chunk_size), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_token_logps[rows].float().unsqueeze(1)
            if softmax is None:
                grad_logits = _chunk_logits(hidden[rows], weight, bias, buffer)
                grad_logits.sub_(normalisers[rows, None]).exp_()
            else:
                grad_logits = softmax
            grad_logits.mul_(-g).scatter_add_(1, targets[rows, None], g)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  buffer: torch.Tensor) -> torch.Tensor:
    """(rows, V) float32 logits of `hidden` (rows, H), written into the first rows of `buffer`.

    The product is taken in the weight's dtype, as the model's own head would, then held in float32.
    """
    out = buffer[:hidden.shape[0]]
    if weight.dtype == torch.float32:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return out.copy_(F.linear(hidden.to(weight.dtype), weight, bias))


def _softmax_and_logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) logsumexp over the last dim of (rows, V) `logits`, which it overwrites with their softmax."""
    maxes = logits.amax(dim=1, keepdim=True)
    # a row of −inf logits would give nan in (logits − max); such a row has no probability to normalise
    maxes.masked_fill_(~torch.isfinite(maxes), 0)
    sums = logits.sub_(maxes).exp_().sum(dim=1, keepdim=True)
    logits.div_(sums)
    return sums.log_().add_(maxes).squeeze(1)


def label_logps_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                            labels: torch.Tensor, chunk_size: int = 1024,
                            average_log_prob: bool = False) -> torch.Tensor:
    """`_get_batch_logps(F.linear(hidden, head_weight, head_bias), labels, average_log_prob)` without the logits.

    Args:
        hidden: (batch, seq, hidden) final hidden states (after the last norm), position t predicts token t + 1.
        head_weight, head_bias: the output projection, (vocab, hidden) and (vocab,) or None.
        labels: (batch, seq) token ids, −100 where no loss is taken (prompt, padding).
        chunk_size: labelled tokens per block of the vocabulary projection; peak memory of the head is
            about 3 · chunk_size · vocab floats in the backward pass, instead of 2 · batch · seq · vocab.
        average_log_prob: the mean per labelled token instead of the sum.

    Returns:
        (batch,) float32, equal to the naive computation up to float32 rounding (same logits, same
        float32 log-softmax). Only the labelled positions are projected: prompts and padding carry no
        loss, and in preference data they are about half of every sequence.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f'hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree in (batch, seq)')
    loss_mask = labels[:, 1:] != -100
    token_logps = _ChunkedLabelLogps.apply(hidden[:, :-1][loss_mask], head_weight, head_bias,
                                           labels[:, 1:][loss_mask], chunk_size)
    return _per_sequence(token_logps, loss_mask, average_log_prob)


def _per_sequence(token_logps: torch.Tensor, loss_mask: torch.Tensor, average_log_prob: bool) -> torch.Tensor:
    """(batch,) sums (or means) of the (N,) labelled-token values, N = loss_mask.sum(), in row-major order.

    A row without labels gets 0, as in `_get_batch_logps`.
    """
    rows = loss_mask.nonzero()[:, 0]
    summed = torch.zeros(loss_mask.shape[0], dtype=torch.float32, device=token_logps.device)
    summed = summed.index_add(0, rows, token_logps.float())
    if average_log_prob:
        return summed / loss_mask.sum(-1).clamp(min=1)
    return summed


def sharded_head_label_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) summed label log-probabilities with `head` called as a module on the labelled positions only.

    For a head whose weight is sharded over the vocabulary (tensor parallelism): the module's hooks
    gather its output, which `label_logps_from_hidden` could not do with the weight shard alone.
    """
    loss_mask = labels[:, 1:] != -100
    logits = head(hidden[:, :-1][loss_mask])
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    targets = labels[:, 1:][loss_mask]
    token_logps = logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return _per_sequence(token_logps, loss_mask, average_log_prob=False)


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


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN or infinite loss or gradient norm."""


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the training loop checks between steps.

    A preempted or Ctrl-C'd run then finishes its step, saves a checkpoint and exits cleanly. A second
    Ctrl-C interrupts at once (the last complete checkpoint stays loadable).
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        rank0_print(f'\n{self.signal_name} received: finishing this step, then saving a checkpoint '
                    f'(Ctrl-C again to stop at once)')


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (e.g. not under a test runner's worker)."""
    return threading.current_thread() is threading.main_thread()


class DummyWandb:
    """Stands in for wandb when it is off (disabled, debug mode, or a process other than rank 0)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass


class BasicTrainer:
    """SFT or preference training (DPO, cDPO, IPO, β-DPO) in one process.

    With several GPUs the model is split across them (train.py loads it with device_map='balanced'):
    N times the memory, no parallel compute. Subclasses change how the model is placed and how
    state is gathered, through small hooks: `checkpoint_activations`, `clip_gradient`, `policy_state_dict`,
    `optimizer_state_dict`, `load_optimizer_state_dict`, `export_pretrained`.
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

        # Loss-mode flags, derived once.
        self.sft = config.loss.name == 'sft'
        self.uses_reference_model = not self.sft
        self.beta_dpo = not self.sft and config.loss.mode_loss == 'beta_DPO'

        self.policy = policy
        if config.activation_checkpointing:
            self.checkpoint_activations()
        if config.compile_policy:
            # nn.Module.compile compiles in place: the class and the state dict's keys stay as they are.
            self.policy.compile()
        self.reference_model = reference_model
        # pair key -> (chosen, rejected) reference log-probabilities, once precompute_reference_logps ran
        self.reference_cache: Optional[Dict[str, Tuple[float, float]]] = None
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
            max_prompt_length=config.max_prompt_length, sft_mode=self.sft, silent=not self.is_main,
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
        self.setup_optimization()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        if self.config.resume_from:
            self.restore(Path(self.config.resume_from) / 'LATEST')
        if self.reference_model is not None:
            self.reference_model.eval()
            if self.config.precompute_ref_log_probs:
                self.precompute_reference_logps()

        last_log = None
        progress = tqdm.tqdm(total=self.config.n_examples, initial=self.example_counter, unit='ex',
                             desc='Training', disable=not self.is_main, dynamic_ncols=True)
        with StopRequest() as stop:
            for batch in self.train_batches():
                if self.eval_due():
                    self.evaluate_and_save()
                metrics = self.train_step(batch)
                progress.update(self.config.batch_size)
                if last_log is None or time.time() - last_log > self.config.minimum_log_interval_secs:
                    self.log(metrics, split='train')
                    last_log = time.time()
                if self.any_rank(stop.signal_name is not None):
                    self.save_before_stopping(stop.signal_name or 'a signal to another process')
                    progress.close()
                    return
        progress.close()
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

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any process. Decisions that change what every rank does next (stop and
        save, skip a batch) must agree, or the ranks' collectives no longer match and the job hangs."""
        if not dist.is_initialized():
            return flag
        flag_tensor = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(flag_tensor, op=dist.ReduceOp.MAX)
        return bool(flag_tensor.item())

    def train_batches(self):
        """The training stream, from the current position (0, or where a resumed run stopped)."""
        return get_batch_iterator(**self.data_kwargs, split='train', n_epochs=self.config.n_epochs,
                                  n_examples=self.config.n_examples, batch_size=self.config.batch_size,
                                  seed=self.seed, start_example=self.example_counter,
                                  bucket_batches=self.config.get('length_bucket_batches'))

    def eval_due(self) -> bool:
        if self.example_counter % self.config.eval_every != 0 or self.last_eval_example == self.example_counter:
            return False
        return self.example_counter > 0 or self.config.do_first_eval

    def train_step(self, batch: Dict) -> Dict[str, float]:
        """One optimizer step over `batch`, accumulated over gradient_accumulation_steps microbatches."""
        self.policy.train()
        start_time = time.time()
        accumulation = self.config.gradient_accumulation_steps
        metrics = defaultdict(list)
        losses = []
        stats_before = self.margin_stats.state_dict()
        for microbatch_idx in range(accumulation):
            global_microbatch = slice_and_move_batch_for_device(batch, microbatch_idx, accumulation, 'cpu')
            local_microbatch = slice_and_move_batch_for_device(global_microbatch, self.dp_rank, self.dp_size, self.device)
            loss, microbatch_metrics = self.get_batch_metrics(local_microbatch, train=True)
            (loss / accumulation).backward()
            losses.append(loss.detach())
            for k, v in microbatch_metrics.items():
                metrics[k].extend(v)

        grad_norm = self.clip_gradient()
        locally_finite = bool(torch.isfinite(torch.stack(losses)).all()) and math.isfinite(grad_norm)
        if not self.any_rank(not locally_finite):
            self.optimizer.step()
        else:
            self.handle_nonfinite(batch, losses, grad_norm)
            self.margin_stats.load_state_dict(stats_before)  # a skipped batch leaves no trace in β-DPO's statistics
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.batch_counter += 1
        self.example_counter += self.config.batch_size
        metrics = {k: sum(v) / len(v) for k, v in metrics.items()}
        metrics['examples_per_second'] = self.config.batch_size / (time.time() - start_time)
        metrics['grad_norm'] = grad_norm
        metrics['lr'] = self.scheduler.get_last_lr()[0]
        metrics['padding/fraction'] = padding_fraction(batch)
        return metrics

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
        latest = self.run_dir / 'LATEST'
        kept = (f'The last checkpoint, {latest.resolve()}, is intact' if latest.exists()
                else f'No checkpoint was written yet to {self.run_dir}')
        raise NonFiniteLossError(
            f'Non-finite {what} at {where}. {kept}. Lower lr, check the data of this batch, or pass '
            f'on_nonfinite=skip to skip such batches.')

    # ----- losses and metrics -------------------------------------------------------------------------

    def forward_logps(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """(batch,) summed log-probabilities of the label tokens under `model` (a Hugging Face causal LM).

        With logps_chunk_size set, the model runs through its own forward (so FSDP's and tensor
        parallelism's hooks fire) but keeps only its last, normed hidden state (output_hidden_states=-1)
        and projects no position through its head (logits_to_keep = an all-False mask); the head is then
        applied to the labelled positions only, a chunk at a time (`label_logps_from_hidden`). FSDP2
        leaves the root module's parameters, the head's among them, unsharded after the forward, and
        reduces their gradients at the end of the backward pass, so the head's weight can be used here.
        A head whose weight stays sharded (tensor parallelism's colwise lm_head) is called as a module
        on the labelled positions instead: its hooks gather the vocabulary, so full-width logits exist
        for those positions, still not for the prompt and padding.
        """
        chunk_size = self.config.logps_chunk_size
        if not chunk_size:
            logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
            return _get_batch_logps(logits, labels, average_log_prob=False)
        outputs = model(input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=-1,
                        logits_to_keep=torch.zeros_like(labels, dtype=torch.bool))
        hidden = outputs.hidden_states[-1]
        head = model.get_output_embeddings()
        # The head in float32 (or its own dtype) even under the policy's autocast: see _get_batch_logps.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if isinstance(head.weight, DTensor):
                return sharded_head_label_logps(head, hidden, labels)
            return label_logps_from_hidden(hidden, head.weight, head.bias, labels, chunk_size)

    def concatenated_forward(self, model: nn.Module, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the chosen and rejected responses from one forward pass over both."""
        concatenated = concatenated_inputs(batch)
        all_logps = self.forward_logps(model, concatenated['concatenated_input_ids'],
                                       concatenated['concatenated_attention_mask'], concatenated['concatenated_labels'])
        n = batch['chosen_input_ids'].shape[0]
        return all_logps[:n], all_logps[n:]

    def reference_logps(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """The frozen reference model's log-probabilities of the chosen and rejected responses.

        From the precomputed cache when precompute_ref_log_probs is on (`precompute_reference_logps`).
        """
        if self.reference_cache is not None:
            keys = pair_keys(batch)
            missing = [k for k in keys if k not in self.reference_cache]
            if missing:
                raise RuntimeError(f'{len(missing)} pairs of this batch are not in the precomputed reference '
                                   f'log-probabilities (first prompt: {batch["prompt"][0][:80]!r})')
            values = torch.tensor([self.reference_cache[k] for k in keys], dtype=torch.float32, device=self.device)
            return values[:, 0], values[:, 1]
        with torch.no_grad():
            return self.concatenated_forward(self.reference_model, batch)

    def precompute_reference_logps(self) -> None:
        """One pass of the reference model over the training stream and the evaluation batches, then free it.

        The log-probabilities are cached per pair (keyed by a hash of its prompt, chosen and rejected
        texts) in one file per model, model.archive, reference dtype, data and length settings
        (`reference_cache_path`), so later runs on the same data skip the pass, and a different
        seed or n_examples computes only the pairs it lacks. Each data-parallel rank computes its slice
        of a batch and all ranks gather the whole (tensor-parallel ranks all compute the whole batch);
        rank 0 reads the file and sends it to the others, then writes it atomically while they wait.
        Collective: every rank must call it.
        """
        path = reference_cache_path(self.config, self.tokenizer)
        cache = load_reference_cache(path) if self.is_main else None
        if dist.is_initialized():
            shared = [cache]
            dist.broadcast_object_list(shared, src=0)
            cache = shared[0]
        n_cached = len(cache)
        for batch in tqdm.tqdm(self.reference_pass_batches(), desc='Reference log-probabilities',
                               disable=not self.is_main, leave=False):
            keys = pair_keys(batch)
            if all(k in cache for k in keys):
                continue
            local_batch = slice_and_move_batch_for_device(batch, self.dp_rank, self.dp_size, self.device)
            with torch.no_grad():
                chosen, rejected = self.concatenated_forward(self.reference_model, local_batch)
            pairs = torch.stack([self.gather(chosen), self.gather(rejected)], dim=1).float().cpu().tolist()
            cache.update(zip(keys, pairs))
        if self.is_main and len(cache) > n_cached:
            save_reference_cache(cache, path)
        if dist.is_initialized():
            dist.barrier()  # the file is complete before any rank goes on (and, say, starts the next run)
        rank0_print(f'reference log-probabilities of {len(cache)} pairs ({len(cache) - n_cached} computed now) '
                    f'in {path}; the reference model is freed')
        self.reference_cache = cache
        self.reference_model = None

    def reference_pass_batches(self):
        """The batches of the reference pass, before the data-parallel split: each training batch's
        gradient_accumulation_steps microbatches, as train_step slices them (so the pass never runs a
        larger forward than training does), then the evaluation batches."""
        accumulation = self.config.gradient_accumulation_steps
        for batch in self.train_batches():
            for microbatch_idx in range(accumulation):
                yield slice_and_move_batch_for_device(batch, microbatch_idx, accumulation, 'cpu')
        yield from self.eval_batches

    def policy_autocast(self):
        """torch.autocast in policy_autocast's dtype on a GPU; nothing elsewhere (CPU autocast is slower)."""
        if self.config.policy_autocast is None or self.device.type != 'cuda':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.config.policy_autocast))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """`values` of every data-parallel process, concatenated in rank order (detached)."""
        return all_gather_if_needed(values.detach(), self.dp_rank, self.dp_size)

    def get_batch_metrics(self, batch: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """The loss of this process's microbatch (to backpropagate) and its metrics (lists over all ranks)."""
        split = 'train' if train else 'eval'
        if self.sft:
            with self.policy_autocast():
                policy_chosen_logps = self.forward_logps(self.policy, batch['chosen_input_ids'],
                                                         batch['chosen_attention_mask'], batch['chosen_labels'])
            loss = -policy_chosen_logps.mean()
            metrics = {f'logps_{split}/chosen': self.gather(policy_chosen_logps),
                       f'loss/{split}': self.gather(loss.reshape(1))}
            return loss, {k: v.float().cpu().tolist() for k, v in metrics.items()}

        with self.policy_autocast():
            policy_chosen_logps, policy_rejected_logps = self.concatenated_forward(self.policy, batch)
        reference_chosen_logps, reference_rejected_logps = self.reference_logps(batch)
        loss_config = self.config.loss
        local_keep = None
        beta = loss_config.beta
        metrics = {}
        if self.beta_dpo:
            beta, local_keep, batch_metrics = self.beta_dpo_filter(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, train)
            metrics.update({f'record_{split}/{k}': v for k, v in batch_metrics.items()})

        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=beta, label_smoothing=loss_config.label_smoothing, ipo=loss_config.name == 'ipo',
            reference_free=loss_config.reference_free)
        if local_keep is None:
            loss = losses.mean()
        else:
            # The mean over the kept pairs of the whole batch across ranks. Data-parallel gradients are
            # averaged over dp_size ranks, hence the factor dp_size (β-DPO's original divided by each
            # rank's own kept count, weighting pairs unequally).
            n_kept = batch_metrics['mask_count'][0]
            loss = (losses * local_keep).sum() * self.dp_size / n_kept

        metrics.update({
            f'rewards_{split}/chosen': self.gather(chosen_rewards),
            f'rewards_{split}/rejected': self.gather(rejected_rewards),
            f'rewards_{split}/accuracies': self.gather((chosen_rewards > rejected_rewards).float()),
            f'rewards_{split}/margins': self.gather(chosen_rewards - rejected_rewards),
            # the margin without β, (π_c − ref_c) − (π_r − ref_r): comparable between runs of different β and
            # across β-DPO's batches, whose rewards are scaled by each batch's own β
            f'rewards_{split}/logratio_margins': self.gather(
                (policy_chosen_logps - reference_chosen_logps - policy_rejected_logps + reference_rejected_logps).detach()),
            f'logps_{split}/chosen': self.gather(policy_chosen_logps),
            f'logps_{split}/rejected': self.gather(policy_rejected_logps),
            f'loss/{split}': self.gather(loss.detach().reshape(1) / self.dp_size).sum().reshape(1),
        })
        return loss, {k: (v.float().cpu().tolist() if torch.is_tensor(v) else v) for k, v in metrics.items()}

    def beta_dpo_filter(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, train: bool):
        """β-DPO for one microbatch: (β_used, this rank's keep mask as floats, metrics).

        The margins of the whole microbatch are gathered from all ranks; the running statistics are
        updated in training only, before dynamic_beta reads them (the reference implementation's order).
        Evaluation draws from its own generator so it never shifts the training stream's draws.
        """
        loss_config = self.config.loss
        reference_term = 0 if loss_config.reference_free else reference_chosen_logps - reference_rejected_logps
        local_margins = (policy_chosen_logps - policy_rejected_logps - reference_term).detach()
        beta_used, keep = self.batch_beta_and_mask(self.gather(local_margins), train)
        n_local = local_margins.shape[0]
        local_keep = keep[self.dp_rank * n_local:(self.dp_rank + 1) * n_local].to(local_margins.device).float()
        metrics = {'beta_used': [beta_used.item()], 'mask_count': [int(keep.sum())],
                   'kept_fraction': [keep.float().mean().item()],
                   'gap_mean': [self.margin_stats.mean.item()], 'gap_std': [self.margin_stats.std.item()]}
        return beta_used.to(local_margins.device), local_keep, metrics

    def batch_beta_and_mask(self, margins: torch.Tensor, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """β and the keep mask of the whole microbatch from its (N,) margins gathered over all ranks.

        Identical on every rank by construction: the same margins, the same statistics, and a generator
        seeded alike everywhere that nothing else draws from.
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
            local_batch = slice_and_move_batch_for_device(eval_batch, self.dp_rank, self.dp_size, self.device)
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(local_batch, train=False)
            for k, v in metrics.items():
                all_metrics[k].extend(v)
        mean_metrics = {k: sum(v) / len(v) for k, v in all_metrics.items()}
        if self.gold_eval_enabled():
            mean_metrics.update(self.gold_eval())
        if self.config.sample_during_eval:
            self.log_samples()
        return mean_metrics

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
            local_batch = slice_and_move_batch_for_device(batch, self.dp_rank, self.dp_size, self.device)
            texts = self.generate(self.policy, local_batch, do_sample=False)
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
                local_batch = slice_and_move_batch_for_device(eval_batch, self.dp_rank, self.dp_size, self.device)
                prompts.extend(eval_batch['prompt'])
                policy_samples.extend(self.generate(self.policy, local_batch))
                if self.reference_model is not None:
                    reference_samples.extend(self.generate(self.reference_model, local_batch))
        rank0_print('policy samples:\n' + json.dumps(policy_samples[:4], indent=2))
        if reference_samples:
            rank0_print('reference samples:\n' + json.dumps(reference_samples[:4], indent=2))
        if self.is_main and not isinstance(self.wandb, DummyWandb):
            import wandb
            for name, samples in (('policy_samples', policy_samples), ('reference_samples', reference_samples)):
                if samples:
                    table = wandb.Table(columns=['step', 'prompt', 'sample'],
                                        data=[[self.example_counter, p, s] for p, s in zip(prompts, samples)])
                    self.wandb.log({name: table}, step=self.example_counter)

    def generate(self, model: nn.Module, batch: Dict, do_sample: bool = True) -> List[str]:
        """Decoded continuations (prompt included) of the batch's prompts, gathered from all ranks."""
        with torch.no_grad():
            output = model.generate(batch['prompt_input_ids'], attention_mask=batch['prompt_attention_mask'],
                                    max_length=self.config.max_length, do_sample=do_sample,
                                    pad_token_id=self.tokenizer.pad_token_id,
                                    # sharded models: every rank runs each step until all ranks are done
                                    synced_gpus=self.dp_size > 1)
        output = pad_to_length(output, self.config.max_length, self.tokenizer.pad_token_id)
        output = all_gather_if_needed(output, self.dp_rank, self.dp_size)
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)

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
        if self.config.debug:
            return
        with open(self.run_dir / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps({'split': split, **metrics}) + '\n')

    # ----- checkpoints --------------------------------------------------------------------------------

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
        """Write RUN_DIR/step-N/ atomically, then point RUN_DIR/LATEST at it (no-op in debug mode).

        policy.pt, optimizer.pt and scheduler.pt are {'step_idx', 'state', 'metrics'} as in the
        original, so `model.archive=RUN_DIR/LATEST/policy.pt` starts a DPO run from any trainer's SFT.
        """
        if self.config.debug:
            rank0_print('skipping save in debug mode')
            return
        policy_state = self.policy_state_dict()
        optimizer_state = self.optimizer_state_dict()
        if self.is_main:
            step_name = f'step-{self.example_counter}'
            wrap = lambda state: {'step_idx': self.example_counter, 'state': state, 'metrics': metrics or {}}
            with atomic_checkpoint_dir(self.run_dir / step_name) as tmp:
                torch.save(wrap(policy_state), tmp / 'policy.pt')
                torch.save(wrap(optimizer_state), tmp / 'optimizer.pt')
                torch.save(wrap(self.scheduler.state_dict()), tmp / 'scheduler.pt')
                torch.save(self.trainer_state(), tmp / 'trainer_state.pt')
                (tmp / 'beta_dpo_stats.json').write_text(json.dumps(self.margin_stats.state_dict()) + '\n')
            point_latest_to(self.run_dir, step_name)
            rank0_print(f'saved checkpoint {self.run_dir / step_name}')
        if dist.is_initialized():
            dist.barrier()

    def restore(self, checkpoint_dir: Path) -> None:
        """Continue from `checkpoint_dir` (a resume): optimizer, scheduler, counters, statistics, RNGs.

        The policy weights were loaded by train.py before the model was wrapped.
        """
        self.load_optimizer_state_dict(load_checkpoint_file(checkpoint_dir / 'optimizer.pt', 'optimizer state')['state'])
        self.scheduler.load_state_dict(load_checkpoint_file(checkpoint_dir / 'scheduler.pt', 'scheduler state')['state'])
        state = load_checkpoint_file(checkpoint_dir / 'trainer_state.pt', 'trainer state')
        self.example_counter = state['example_counter']
        self.batch_counter = state['batch_counter']
        self.skipped_batches = state['skipped_batches']
        self.margin_stats.load_state_dict(state['margin_stats'])
        self.filter_generator.set_state(state['filter_generator'])
        torch.set_rng_state(state['torch_rng'])
        self.last_eval_example = state['last_eval_example']
        if self.is_main:
            truncate_metrics_log(self.run_dir / 'metrics.jsonl', self.example_counter)
            for leftover in remove_incomplete_checkpoints(self.run_dir):
                rank0_print(f'cleaned up {leftover.name}, left by a save of the interrupted run')
        rank0_print(f'Resumed from {checkpoint_dir.resolve()} at {self.example_counter} examples')

    def export_pretrained(self, output_dir: Path) -> None:
        """Save the policy in Hugging Face format (safetensors, config, tokenizer) for from_pretrained / vLLM."""
        if self.config.debug:
            return
        state = self.policy_state_dict()
        if self.is_main:
            with atomic_checkpoint_dir(output_dir) as tmp:
                unwrap(self.policy).save_pretrained(tmp, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
            rank0_print(f'exported the policy in Hugging Face format to {output_dir}')
        if dist.is_initialized():
            dist.barrier()


class ShardedTrainer(BasicTrainer):
    """What FSDPTrainer and TensorParallelTrainer share: the model is split over the processes.

    The models arrive whole on rank 0 and empty (on the meta device, no memory) on the other ranks
    (train.build_models); each trainer splits them with `split`, then rank 0's weights are broadcast
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
        set_optimizer_state_dict(self.policy, self.optimizer, optimizer_state_by_name(state, self.trainable_names),
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


class FSDPTrainer(ShardedTrainer):
    """Fully sharded data parallel (PyTorch's FSDP2, `fully_shard`): each process holds 1/N of the
    parameters, gradients and optimizer state, and computes 1/N of each batch.

    Every transformer block (model.block_name) is sharded as one unit, then the root; a block's
    parameters are gathered just before it runs and freed after. model.fsdp_policy_mp=bfloat16 computes
    in bfloat16 and reduces gradients in float32 while the sharded parameters and the optimizer stay
    in model.policy_dtype; activation_checkpointing=true recomputes each block's activations in the
    backward pass.
    """

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        blocks = get_block_modules(model, self.config.model.block_name)
        if self.config.activation_checkpointing and not reference:
            blocks = checkpoint_blocks(model, blocks)
        mp_dtype = self.config.model.fsdp_policy_mp
        mixed_precision = (MixedPrecisionPolicy(param_dtype=getattr(torch, mp_dtype), reduce_dtype=torch.float32)
                           if mp_dtype else MixedPrecisionPolicy())
        for block in blocks:
            fully_shard(block, mp_policy=mixed_precision)
        return fully_shard(model, mp_policy=mixed_precision)


class TensorParallelTrainer(ShardedTrainer):
    """Tensor parallel (`torch.distributed.tensor.parallel`): every weight matrix of the attention and
    MLP layers is split over the processes, which all compute the same batch together.

    The split follows the model's own plan (`base_model_tp_plan` of its transformers config: column-
    wise q/k/v and up projections, row-wise output and down projections), so GPT-NeoX and Llama
    families work as they are. Attention heads (and key/value heads) must divide by the number of
    processes. Embeddings and norms are replicated.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every rank computes the whole batch; there is no data-parallel split.
        self.dp_rank, self.dp_size = 0, 1

    def split(self, model: nn.Module, reference: bool) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # src_data_rank=None: each rank keeps its own slice without communication (the weights on
        # ranks other than 0 are still empty; split_and_load fills them from rank 0 afterwards).
        parallelize_module(model, mesh, tensor_parallel_plan(model, self.world_size), src_data_rank=None)
        if not next(model.parameters()).is_meta:
            model.to(self.device)  # the split matrices are on the GPU now; the rest is where it was built
        if self.config.activation_checkpointing and not reference:
            # After the split: the plan names modules by their paths, which the wrappers change.
            checkpoint_blocks(model, get_block_modules(model, self.config.model.block_name))
        return model


def split_and_load(model: nn.Module, split, device: torch.device) -> nn.Module:
    """`split(model)`, then rank 0's weights broadcast into every rank's part. Collective.

    Only rank 0 needs real weights: the other ranks' `model` may be on the meta device (allocated on
    `device` here, after the split, so that no process ever holds a second full copy).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full_state = dict(model.state_dict()) if dist.get_rank() == 0 else {}
    model = split(model)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
        if getattr(model.config, 'tie_word_embeddings', False):
            model.tie_weights()  # to_empty gives each module its own new tensor, which unties them
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for buffer in model.buffers():  # not in the state dict (e.g. rotary frequencies): rank 0's too
            dist.broadcast(buffer, src=0)
    return model


def checkpoint_blocks(model: nn.Module, blocks: List[nn.Module]) -> List[nn.Module]:
    """Wrap each block so its activations are recomputed in the backward pass; returns the wrappers.

    The wrappers replace the blocks in their parents; state-dict keys do not change.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    targets = {id(block) for block in blocks}
    wrappers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                wrapper = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                parent.register_module(name, wrapper)
                wrappers.append(wrapper)
    return wrappers


# transformers' tensor-parallel style names, as torch ParallelStyles. Colwise splits a Linear's output
# features, rowwise its input features (and sums the partial outputs); *_gather_output / *_rep /
# *_split_input return or take whole (replicated) tensors.
TP_STYLES = {
    'colwise': lambda: ColwiseParallel(),
    'local_colwise': lambda: ColwiseParallel(),
    'colwise_rep': lambda: ColwiseParallel(output_layouts=Replicate()),
    'colwise_gather_output': lambda: ColwiseParallel(output_layouts=Replicate()),
    'rowwise': lambda: RowwiseParallel(),
    'local_rowwise': lambda: RowwiseParallel(),
    'rowwise_rep': lambda: RowwiseParallel(input_layouts=Replicate()),
    'rowwise_split_input': lambda: RowwiseParallel(input_layouts=Replicate()),
}


def tensor_parallel_plan(model: nn.Module, world_size: int) -> Dict[str, ParallelStyle]:
    """{module path pattern: torch ParallelStyle} from the model's transformers tensor-parallel plan.

    `config.base_model_tp_plan` names modules inside the base model (e.g. `layers.*.mlp.up_proj`), so
    its keys get the base model's prefix (`model.`, `gpt_neox.`); the head's plan (`lm_head`) is added
    unless the input and output embeddings are tied: splitting lm_head would replace the shared
    weight and silently untie them.
    """
    config = model.config
    name = type(model).__name__
    base_plan = getattr(config, 'base_model_tp_plan', None)
    if not base_plan:
        raise ValueError(f'{name} has no tensor-parallel plan (config.base_model_tp_plan); use trainer=FSDPTrainer')
    for key in ('num_attention_heads', 'num_key_value_heads'):
        heads = getattr(config, key, None)
        if heads is not None and heads % world_size:
            raise ValueError(f'TensorParallelTrainer splits attention heads over {world_size} processes, but {name} '
                             f'has {key}={heads}; use a number of processes that divides it, or trainer=FSDPTrainer')
    plan = {f'{model.base_model_prefix}.{key}': style for key, style in base_plan.items()}
    if not getattr(config, 'tie_word_embeddings', False):
        plan.update(getattr(model, '_tp_plan', None) or {})
    unknown = sorted({style for style in plan.values() if style not in TP_STYLES})
    if unknown:
        raise ValueError(f'{name}: tensor-parallel styles {unknown} are not supported here '
                         f'(supported: {", ".join(TP_STYLES)}); use trainer=FSDPTrainer')
    return {key: TP_STYLES[style]() for key, style in plan.items()}


def clip_grad_norm(parameters, max_norm: float, device: torch.device) -> float:
    """Clip gradients split over processes to a global L2 norm ≤ max_norm; returns the norm before clipping.

    Gradients that are DTensors sharded over the ranks (FSDP's, TP's split matrices) add their local
    squares over all ranks; replicated ones (TP's embeddings and norms, identical on every rank) count
    once. One all-reduce in all. Same rule as torch.nn.utils.clip_grad_norm_: scale by
    max_norm / (norm + 1e-6) when that is below 1. Collective.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded_squares = torch.zeros((), device=device)
    replicated_squares = torch.zeros((), device=device)
    for grad in grads:
        if isinstance(grad, DTensor) and any(placement.is_shard() for placement in grad.placements):
            sharded_squares += torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32) ** 2
        else:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            replicated_squares += torch.linalg.vector_norm(local, dtype=torch.float32) ** 2
    dist.all_reduce(sharded_squares)
    total = (sharded_squares + replicated_squares).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
    for grad in grads:
        grad.mul_(scale)
    return total.item()


def full_state_dict_options():
    """Gather whole tensors to CPU on rank 0 (the other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state_by_index(state: Dict, names: List[str]) -> Dict:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's) in torch's own
    layout, keyed by the parameter's position, as BasicTrainer saves it."""
    index = {name: i for i, name in enumerate(names)}
    return {'state': {index[name]: value for name, value in state['state'].items()},
            'param_groups': [{**group, 'params': [index[name] for name in group['params']]}
                             for group in state['param_groups']]}


def optimizer_state_by_name(state: Dict, names: List[str]) -> Dict:
    """The inverse of optimizer_state_by_index."""
    return {'state': {names[i]: value for i, value in state['state'].items()},
            'param_groups': [{**group, 'params': [names[i] for i in group['params']]}
                             for group in state['param_groups']]}


def fused_optimizer_applies(optimizer_class: type, params: List[torch.Tensor]) -> bool:
    """Whether to ask `optimizer_class` for its fused kernel (one pass over each parameter instead of
    one per elementwise op: on a 2-core CPU, AdamW over 14M parameters takes 0.06 s instead of 0.56 s).

    PyTorch has fused Adam, AdamW, SGD and Adagrad for CPU and CUDA tensors; sharded (DTensor)
    parameters keep the default multi-tensor path, which every trainer supports.
    """
    accepts_fused = 'fused' in inspect.signature(optimizer_class).parameters
    plain = all(type(p) is nn.Parameter and p.device.type in ('cpu', 'cuda') and p.is_floating_point() for p in params)
    return accepts_fused and plain and len(params) > 0


def with_own_implementation(optimizer: torch.optim.Optimizer, state: Dict) -> Dict:
    """`state` (an optimizer state dict) with `optimizer`'s own choice of kernel (fused / foreach).

    load_state_dict would otherwise copy the saving run's choice, and a checkpoint of a fused
    BasicTrainer run resumed under a sharded trainer would ask for fused kernels on DTensors.
    """
    own = {key: optimizer.param_groups[0].get(key) for key in ('fused', 'foreach')}
    groups = [{**group, **{k: v for k, v in own.items() if k in group}} for group in state['param_groups']]
    return {**state, 'param_groups': groups}


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside any wrapper."""
    return getattr(model, 'module', model)


def first_device(model: nn.Module) -> torch.device:
    """Where a (possibly GPU-split) model takes its inputs."""
    device_map = getattr(model, 'hf_device_map', None)
    if device_map:
        first = next(iter(device_map.values()))
        return torch.device(f'cuda:{first}' if isinstance(first, int) else first)
    return next(model.parameters()).device


def load_tokenizer(config: DictConfig):
    """The tokenizer of config.model (a Hub id, a directory, or an embedded model); pad = EOS if unset."""
    import transformers
    name = config.model.tokenizer_name_or_path or config.model.name_or_path
    path = materialize_model(name, get_local_dir(config.local_dirs))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, cache_dir=get_local_dir(config.local_dirs))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def dataset_options(config: DictConfig) -> Dict:
    """Options the data loaders read (render_hh_with_chat_template, and the synthetic block); plain dict."""
    options = {'render_hh_with_chat_template': True} if config.render_hh_with_chat_template else {}
    return {**options, **({'synthetic': OmegaConf.to_container(config.synthetic, resolve=True)} if 'synthetic' in config else {})}


def truncate_metrics_log(path: Path, up_to_example: int) -> None:
    """Drop metrics.jsonl lines logged after `up_to_example` (a resumed run logs them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get('counters/examples', 0) <= up_to_example]
    atomic_write_text(path, ''.join(line + '\n' for line in kept))


# Bump when the meaning of the cached reference log-probabilities changes.
REFERENCE_CACHE_VERSION = 1


def pair_keys(batch: Dict) -> List[str]:
    """One key per example of `batch`: a hash of its prompt, chosen and rejected texts."""
    return [hashlib.blake2b('\0'.join(texts).encode('utf-8'), digest_size=16).hexdigest()
            for texts in zip(batch['prompt'], batch['chosen'], batch['rejected'])]


def file_identity(path: Union[str, Path]) -> List:
    """A file's resolved path, size and modification time: changes whenever the file is rewritten."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def model_identity(name_or_path: str, local_dir: str) -> List:
    """What identifies a model's weights: the files of a local directory (or embedded model), else the Hub id."""
    path = Path(materialize_model(name_or_path, local_dir)).expanduser()
    if not path.is_dir():
        return [name_or_path]
    return [file_identity(f) for f in sorted(path.iterdir())
            if f.suffix in ('.json', '.safetensors', '.bin', '.pt') and not f.name.startswith('tokenizer')]


def reference_cache_path(config: DictConfig, tokenizer) -> Path:
    """Where the precomputed reference log-probabilities of this model, archive, data and lengths live."""
    local_dir = get_local_dir(config.local_dirs)
    archive = config.model.archive
    key = json.dumps([
        REFERENCE_CACHE_VERSION, model_identity(config.model.name_or_path, local_dir),
        None if archive is None else file_identity(archive), config.model.reference_dtype,
        tokenizer_identity(tokenizer), config.max_length, config.max_prompt_length, list(config.datasets),
        [data_identity(name, split, dataset_options(config)) for name in config.datasets for split in ('train', 'test')],
        dataset_options(config)], sort_keys=True, default=repr)
    return Path(local_dir) / 'beta_dpo' / 'reference_logps' / f'{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt'


def load_reference_cache(path: Path) -> Dict[str, List[float]]:
    """The cached pair key -> [chosen, rejected] log-probabilities at `path`; empty if absent or unreadable."""
    if not path.exists():
        return {}
    try:
        return dict(torch.load(path, weights_only=True)['logps'])
    except Exception as e:  # a damaged cache is recomputed, never trusted
        rank0_print(f'{path}: unreadable reference log-probability cache ({type(e).__name__}: {e}); recomputing')
        return {}


def save_reference_cache(cache: Dict[str, List[float]], path: Path) -> None:
    save_atomically({'version': REFERENCE_CACHE_VERSION, 'logps': cache}, path)
