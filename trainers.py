"""The trainers: BasicTrainer (one process), then FSDPTrainer and TensorParallelTrainer.

    trainer = BasicTrainer(policy, config, seed, run_dir, reference_model=reference_model)
    trainer.train()        # evaluate and save every eval_every examples, one optimizer step per batch, log

The losses they optimize are in losses.py (every objective by name, β-DPO's dynamic β and filter); BasicTrainer
keeps the loop, the step, the batch's loss and metrics, and evaluation. FSDPTrainer and TensorParallelTrainer split
the model over several processes (train.py starts them, or torchrun does) and change only how the model is placed,
how gradients are clipped and how state is gathered for checkpoints.
"""
import contextlib
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import tqdm
from omegaconf import DictConfig

from checkpoints import TrainerCheckpointing, append_metrics, kept_checkpoint
from distributed import (all_gather_if_needed, any_process, clip_grad_norm, fsdp_split, gathered_model_state,
                         gathered_optimizer_state, load_gathered_optimizer_state, split_and_load, tensor_parallel_split)
from generation import draw_samples, generate_texts, log_sample_tables, print_samples
from logps import (check_packing, concatenated_inputs, concatenated_logps, forward_logps, last_hidden_state,
                   perturbed_label_logps)
from losses import (BetaDPO, BetaDPOBatch, EpsilonBeta, LossMode, chosen_nll, epsilon_betas, epsilon_steps,
                    kto_reference_point, logratio_margins)
from lora import lora_enabled
from models import enable_activation_checkpointing, first_device, load_tokenizer
from optimization import build_optimizer, total_training_steps
from preference_datasets import batch_iterator_kwargs, get_batch_iterator, mismatched_batch, padding_counts
from reference_cache import ReferenceLogps, reference_cache_path, reference_pass_batches
from synthetic_task import gold_eval_accuracy
from utils import (DummyWandb, StopRequest, extend_metrics, formatted_dict, mean_metrics, rank0_print,
                   slice_and_move_batch_for_device)

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
        self.reference = ReferenceLogps.of_run(self.policy, reference_model, self.concatenated_forward, self.lora,
                                               self.mode.uses_reference_model)
        self.tokenizer = load_tokenizer(config)
        self.beta_dpo = BetaDPO(config.loss, seed, self.device)
        # padding_free: the tokens per packed row of a forward pass (logps.pack_sequences), None when padded
        self.pack_tokens = (config.get('padding_free_row_tokens') or config.max_length) \
            if config.get('padding_free') else None
        if self.pack_tokens:
            self.check_packing()
        # ε-DPO's baseline β (moved after every optimizer step) and the steps s_i of the current step's pairs
        self.epsilon_beta = EpsilonBeta(config.loss.beta, self.mode.epsilon) if self.mode.epsilon_dpo else None
        self.epsilon_step_values: List[torch.Tensor] = []

        # examples and optimizer steps so far, batches skipped (on_nonfinite=skip), the last evaluation's step
        self.example_counter = self.batch_counter = self.skipped_batches = 0
        self.last_eval_example = None

        self.data_kwargs = batch_iterator_kwargs(config, self.tokenizer, sft_mode=self.mode.sft, silent=not self.is_main)
        self.eval_batches = list(get_batch_iterator(**self.data_kwargs, split='test', n_examples=config.n_eval_examples,
                                                    batch_size=config.eval_batch_size, seed=seed))
        rank0_print(f'Loaded {len(self.eval_batches)} eval batches of size {config.eval_batch_size}')

    def check_packing(self) -> None:
        """padding_free=true: refuse a policy whose attention lets packed sequences see each other (logps.check_packing,
        one small forward pass)."""
        check_packing(self.policy, self.device)

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

    def padding_fraction(self, microbatches: List[Dict]) -> float:
        """Share of this process's policy forward passes of a step that is padding, in the layout computed: each
        microbatch's local slice padded, or packed into rows of pack_tokens (padding_free)."""
        counts = [padding_counts(slice_and_move_batch_for_device(m, self.dp_rank, self.dp_size, 'cpu'), self.pack_tokens)
                  for m in microbatches]
        return sum(p for p, _ in counts) / sum(t for _, t in counts)

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
            if self.epsilon_beta is not None and self.epsilon_step_values:
                # β ← β/(1 + ε·s̄), s̄ over every pair of the step on all ranks (the authors' accumulated mean)
                self.epsilon_beta.update(torch.cat(self.epsilon_step_values).mean().item())
        else:
            self.handle_nonfinite(batch, losses, grad_norm)
            # a skipped batch leaves no trace in β-DPO's statistics
            self.beta_dpo.margin_stats.load_state_dict(stats_before)
        self.epsilon_step_values = []
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.batch_counter += 1
        self.example_counter += self.config.batch_size
        return {**mean_metrics(metrics),
                'examples_per_second': self.config.batch_size / (time.time() - start_time),
                'grad_norm': grad_norm, 'lr': self.scheduler.get_last_lr()[0],
                'padding/fraction': self.padding_fraction(microbatches)}

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
        return concatenated_logps(model, batch, self.config.logps_chunk_size, self.mode.average_log_prob,
                                  self.pack_tokens)

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
        if self.mode.epsilon_dpo:
            (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             pair_betas, steps) = self.epsilon_forward(batch)
            if train:
                self.epsilon_step_values.append(steps.cpu())
        else:
            with self.policy_autocast():
                policy_chosen_logps, policy_rejected_logps = self.concatenated_forward(self.policy, batch)
            reference_chosen_logps, reference_rejected_logps = self.reference(batch)
        # The implicit reward margin with the reference term even when reference_free drops it from the loss:
        # β-DPO's statistics, filter and β read it so (the original's A_gap), and the rewards are logged so. Without
        # a reference model (SimPO; reference_free without β-DPO) the reference log-probabilities are 0.
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

        if self.mode.epsilon_dpo:
            beta = pair_betas.to(margins.device)
            metrics[f'epsilon_{split}/beta'] = self.gather(beta)      # β_i = β/(1 + ε·s_i) of every pair
            metrics[f'epsilon_{split}/steps'] = steps.tolist()       # s_i ∈ {−1, 0, +1}, already all ranks'
            metrics[f'epsilon_{split}/baseline_beta'] = [self.epsilon_beta.beta]
        if self.mode.kto:
            # β-DPO on KTO (loss=kto loss.mode_loss=beta_DPO): its statistics, β and filter read the pair's margin
            # h = r_c − r_r above, which equals KTO's two arguments summed, (r_c − z0) + (z0 − r_r): z0 cancels, so
            # the margin is the same quantity as under DPO and a pair is kept or dropped whole (both its halves).
            z0 = self.kto_z0(batch)
            metrics[f'kto_{split}/z0'] = [z0.item()]
            losses = self.mode.kto_losses(policy_chosen_logps - reference_chosen_logps,
                                          policy_rejected_logps - reference_rejected_logps, z0.to(margins.device), beta)
        else:
            losses = self.mode.losses(logratio_margins(policy_chosen_logps, policy_rejected_logps,
                                                       reference_chosen_logps, reference_rejected_logps,
                                                       self.mode.reference_free), beta)
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

    def epsilon_forward(self, batch: Dict) -> Tuple[torch.Tensor, ...]:
        """ε-DPO's forward (losses.py, ε-DPO): the policy's (chosen, rejected) log-probs with gradients, the
        reference's, each pair's β_i and step s_i (the steps gathered over all ranks), from one pass of each model:
        the reference's log-probabilities and both perturbed policies' come from the two models' hidden states
        (logps.perturbed_label_logps), never from the full (batch, seq, vocab) logits."""
        concatenated = concatenated_inputs(batch)
        ids, mask = concatenated['concatenated_input_ids'], concatenated['concatenated_attention_mask']
        labels = concatenated['concatenated_labels']
        chunk = self.config.logps_chunk_size
        with self.policy_autocast():
            policy_logps, policy_hidden = forward_logps(self.policy, ids, mask, labels, chunk,
                                                        self.mode.average_log_prob, return_hidden=True)
        model = self.reference.model
        with torch.no_grad(), self.reference.active():
            reference_head = model.get_output_embeddings()
            reference_hidden = last_hidden_state(model, reference_head, ids, mask)
            reference_logps, plus, minus = perturbed_label_logps(
                policy_hidden, self.policy.get_output_embeddings(), reference_hidden, reference_head, labels,
                self.mode.epsilon, chunk, self.mode.average_log_prob)
        n = batch['chosen_input_ids'].shape[0]
        steps = epsilon_steps(policy_logps[:n] - policy_logps[n:], plus[:n] - plus[n:], minus[:n] - minus[n:])
        betas = epsilon_betas(self.epsilon_beta.beta, self.mode.epsilon, steps)
        return (policy_logps[:n], policy_logps[n:], reference_logps[:n], reference_logps[n:], betas,
                self.gather(steps))

    def kto_z0(self, batch: Dict) -> torch.Tensor:
        """KTO's z0 (losses.kto_reference_point) of this microbatch over all ranks: one more forward pass of the policy
        and of the reference, without gradients, on the mismatched pairs (preference_datasets.mismatched_batch)."""
        mismatched = mismatched_batch(batch)
        args = (mismatched['input_ids'], mismatched['attention_mask'], mismatched['labels'], self.config.logps_chunk_size,
                self.mode.average_log_prob)
        with torch.no_grad():
            with self.policy_autocast():
                policy = forward_logps(self.policy, *args, pack_tokens=self.pack_tokens)
            with self.reference.active():
                reference = forward_logps(self.reference.model, *args, pack_tokens=self.pack_tokens)
        return kto_reference_point(self.gather(policy - reference))

    def sft_metrics(self, batch: Dict, train: bool) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """SFT: the mean negative log-likelihood of the chosen responses, and its metrics."""
        split = 'train' if train else 'eval'
        with self.policy_autocast():
            policy_chosen_logps = forward_logps(self.policy, batch['chosen_input_ids'], batch['chosen_attention_mask'],
                                                batch['chosen_labels'], self.config.logps_chunk_size,
                                                pack_tokens=self.pack_tokens)
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
        warning = self.warmup_warning()
        if warning:
            rank0_print(warning)

    def warmup_warning(self) -> Optional[str]:
        """A run that ends inside its warmup never trains at lr (a short SFT at the original's lr 5e-7 and 150 warmup
        steps reaches 1.7e-8 after 4 steps and moves nothing): say so, with the lr it ends at."""
        warmup = self.config.warmup_steps
        if warmup == 0:
            return None
        steps = self.total_steps()
        if warmup < steps:
            return None
        final_lr = self.config.lr * steps / (warmup + 1)  # LRSchedule's warmup factor (t + 1)/(warmup + 1) at t = steps − 1
        return (f'WARNING: warmup_steps={warmup} ≥ this run\'s {steps} optimizer steps: the learning rate never reaches '
                f'lr={self.config.lr:g} (it ends at {final_lr:.2g}); lower warmup_steps, e.g. warmup_steps={steps // 10}')

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

    def check_packing(self) -> None:
        """BasicTrainer's probe, then the root's parameters sharded again. FSDP2 leaves the root module's parameters
        unsharded after its forward (until the next backward pass), and while they are, the module holds the
        unsharded plain tensors in place of its sharded DTensors. The probe runs before the optimizer exists, which
        would then be handed those unsharded tensors for the embeddings, final norm and head: FSDP2 frees their
        storage when it reshards after the first backward pass, and the optimizer's first write into one (the
        checkpoint's zero step of torch.distributed.checkpoint's _init_optim_state) ended in a SIGSEGV on 2 gloo
        ranks. FSDPModule.reshard() puts the sharded parameters back."""
        super().check_packing()
        self.policy.reshard()

    @contextlib.contextmanager
    def no_sync_unless(self, last: bool):
        """fsdp_gradient_sync=step: gradients reduce-scattered after the step's last microbatch only (FSDP2's
        set_requires_gradient_sync); before it, each rank accumulates them unsharded, one reduce-scatter per step
        instead of one per microbatch. fsdp_gradient_sync=microbatch: FSDP2's default, a reduce-scatter each time."""
        self.policy.set_requires_gradient_sync(last or self.config.fsdp_gradient_sync == 'microbatch')
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
