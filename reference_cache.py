"""The frozen reference model's log-probabilities of a batch: from the model, or precomputed once and cached.

    from reference_cache import ReferenceLogps
    reference = ReferenceLogps(reference_model, forward)      # forward(model, batch) -> (chosen, rejected)
    reference = ReferenceLogps(policy, forward, switch=adapters_disabled)   # LoRA: the policy, adapters off
    reference = ReferenceLogps.of_run(policy, reference_model, forward, lora=True)   # one of the two above
    chosen, rejected = reference(batch)                        # no gradient
    batches = reference_pass_batches(train_batches, microbatches, eval_batches)   # what the pass computes
    reference.precompute(batches, path, local, gather, is_main)   # one pass, cached on disk; the model is freed

With precompute_ref_log_probs=true the trainer calls `precompute` before training: the reference's
log-probabilities of every training and evaluation pair are computed once, saved under
`<local dir>/beta_dpo/reference_logps/<key>.pt` (keyed by everything that changes their values:
`reference_cache_path`), and the reference model is dropped, which frees its memory for the policy.
The file is written atomically every `precompute_save_every_secs` during the pass and at its end, so a run
killed during the pass computes only the rest when started again; a damaged file is recomputed.

With LoRA (lora.r > 0) there is no second model: the reference is the policy itself inside `switch`
(lora.adapters_disabled: peft's disable_adapter, in eval mode like a separate reference), i.e. the weights the
run started from.
"""
import contextlib
import math
import time
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import tqdm
from omegaconf import DictConfig

from checkpoints import DiskFullError, save_atomically, unreadable_because
from lora import adapters_disabled, lora_enabled
from models import archive_identity, model_identity
from preference_datasets import data_identity, dataset_options, tokenizer_identity
from utils import barrier, fingerprint, get_local_dir, rank0_print


# Bump when the meaning of the cached reference log-probabilities changes.
# 3: keyed by the trainer, processes, device, TF32 and chunking too (before, an FSDP run with
#    model.fsdp_policy_mp=bfloat16 computed the reference in bfloat16 and could share a file with float32 runs)
REFERENCE_CACHE_VERSION = 3  # 2: pair keys from utils.fingerprint; 3: see above


# Size of one pair in the cache file (its 32-character key and two floats, pickled): 68 bytes measured over 10,000
BYTES_PER_PAIR = 68


def pair_keys(batch: Dict) -> List[str]:
    """One key per example of `batch`: a hash of its prompt, chosen and rejected texts."""
    return [fingerprint(*texts, length=32) for texts in zip(batch['prompt'], batch['chosen'], batch['rejected'])]


def reference_cache_path(config: DictConfig, tokenizer, world_size: int, device_type: str) -> Path:
    """`cache_path_here` as rank 0 computes it, on every rank (collective in a process group): the key stats
    model.archive and the model's files, which nodes without a shared disk hold on rank 0's machine only (the
    archive) or as copies of other modification times (the model)."""
    from distributed import rank0_result
    return rank0_result(lambda: cache_path_here(config, tokenizer, world_size, device_type))


def cache_path_here(config: DictConfig, tokenizer, world_size: int, device_type: str) -> Path:
    """Where the precomputed reference log-probabilities live, keyed by everything that changes their values.

    What is computed: the model files, model.archive, the data and the length settings, and whether they are
    means per token (loss.average_log_prob). How: the reference's dtype, TF32 (allow_tf32, on GPUs), the
    head's chunking (logps_chunk_size), padding_free with its row length, the device type, and the trainer with its `world_size` processes (they
    split each batch and sum in another order: FSDP's values agree with BasicTrainer's within 1e-5 relative,
    not bit for bit; tests/test_distributed.py). model.fsdp_policy_mp is not in the key: it sets the policy's
    compute dtype only, never the reference's (distributed.fsdp_split).
    """
    local_dir = get_local_dir(config.local_dirs)
    archive = config.model.archive
    # With LoRA the reference is the policy's own base weights, in the policy's dtype.
    dtype = config.model.policy_dtype if lora_enabled(config) else config.model.reference_dtype
    key = fingerprint(
        REFERENCE_CACHE_VERSION, model_identity(config.model.name_or_path, local_dir),
        None if archive is None else archive_identity(archive), dtype, config.allow_tf32,
        config.logps_chunk_size, config.trainer, world_size, device_type,
        tokenizer_identity(tokenizer), config.max_length, config.max_prompt_length, list(config.datasets),
        [data_identity(name, split, dataset_options(config)) for name in config.datasets for split in ('train', 'test')],
        dataset_options(config), *(['average_log_prob'] if config.loss.average_log_prob else []),
        # packed rows sum in another order: equal within float32 rounding (tests/test_padding_free.py), not bit for
        # bit, so keyed as logps_chunk_size is; absent when off, so the keys of unpacked runs stay what they were
        *([['padding_free', config.get('padding_free_row_tokens') or config.max_length]]
          if config.get('padding_free') else []))
    return Path(local_dir) / 'beta_dpo' / 'reference_logps' / f'{key}.pt'


def reference_pass_batches(train_batches: Iterable[Dict], microbatches: Callable[[Dict], List[Dict]],
                           eval_batches: Iterable[Dict]) -> Iterator[Dict]:
    """The batches of the reference pass, before the data-parallel split: each training batch cut into its
    gradient_accumulation_steps microbatches as the training step cuts it (`microbatches`), so the pass never
    runs a larger forward than training does, then the evaluation batches."""
    for batch in train_batches:
        yield from microbatches(batch)
    yield from eval_batches


def load_reference_cache(path: Path, quiet: bool = False) -> Dict[str, List[float]]:
    """The cached pair key -> [chosen, rejected] log-probabilities at `path`; empty if absent or unreadable."""
    if not path.exists():
        return {}
    try:
        return checked_reference_cache(torch.load(path, weights_only=True))
    except Exception as e:  # a damaged cache is recomputed, never trusted
        if not quiet:
            rank0_print(f'{path}: unreadable reference log-probability cache ({unreadable_because(e)}); recomputing')
        return {}


def checked_reference_cache(state) -> Dict[str, List[float]]:
    """The pairs of a loaded cache file; ValueError unless it is this version's {key: [chosen, rejected]} of floats."""
    if not isinstance(state, dict) or state.get('version') != REFERENCE_CACHE_VERSION:
        raise ValueError(f'not a version {REFERENCE_CACHE_VERSION} reference log-probability cache')
    logps = state.get('logps')
    if not isinstance(logps, dict) or not all(
            isinstance(key, str) and isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(x, float) and not math.isnan(x) for x in pair) for key, pair in logps.items()):
        raise ValueError('its entries are not pairs of log-probabilities')
    return dict(logps)


def save_reference_cache(cache: Dict[str, List[float]], path: Path) -> bool:
    """Write `cache`, with the pairs another run saved at `path` meanwhile, atomically; False (and a warning) when the
    disk is full: the run goes on with the log-probabilities in memory."""
    merged = {**load_reference_cache(path, quiet=True), **cache}
    try:
        save_atomically({'version': REFERENCE_CACHE_VERSION, 'logps': merged}, path,
                        needed_bytes=BYTES_PER_PAIR * len(merged))
    except DiskFullError as e:
        rank0_print(f'WARNING: {e}\nContinuing with the reference log-probabilities in memory, without saving them.')
        return False
    return True


class ReferenceLogps:
    """The frozen reference model's log-probabilities of the chosen and rejected responses of a batch.

    `forward(model, batch) -> (chosen, rejected)` computes them from a model (the trainer's concatenated
    forward). `switch(model)`, if given, is a context inside which `model` is the reference: the policy with its
    LoRA adapters disabled and every module in eval mode; without it `model` is a separate frozen model, put in eval
    mode here. After
    `precompute` they come from the cache and the model is gone (`model` is None).
    """

    def __init__(self, model: Optional[nn.Module], forward: Callable,
                 switch: Optional[Callable[[nn.Module], ContextManager]] = None, uniform: bool = False):
        self.model = model
        self.forward = forward
        self.switch = switch
        # No reference model (SimPO; loss.reference_free without β-DPO): a uniform reference, whose log-probability
        # is the same for every response; 0 stands for it (every margin cancels it).
        self.uniform = uniform
        if model is not None and switch is None:
            model.eval()
        # pair key -> [chosen, rejected], once precompute ran
        self.cache: Optional[Dict[str, List[float]]] = None

    @classmethod
    def of_run(cls, policy: nn.Module, reference_model: Optional[nn.Module], forward: Callable, lora: bool,
               uses_reference_model: bool = True) -> 'ReferenceLogps':
        """A run's reference: none (uniform) unless `uses_reference_model` (LossMode.uses_reference_model); with
        `lora` the policy with its adapters off (the weights the run started from: no second model), else
        `reference_model`."""
        if not uses_reference_model:
            return cls(None, forward, uniform=True)
        if lora:
            return cls(policy, forward, switch=adapters_disabled)
        return cls(reference_model, forward)

    def active(self) -> ContextManager:
        """The context inside which `self.model` computes as the reference (e.g. to sample from it)."""
        return self.switch(self.model) if self.switch is not None else contextlib.nullcontext()

    def __call__(self, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probabilities, each (batch,), float32 from the cache; no gradient."""
        if self.uniform:
            zeros = torch.zeros(len(batch['prompt']), device=batch['chosen_input_ids'].device)
            return zeros, zeros
        if self.cache is None:
            with torch.no_grad(), self.active():
                return self.forward(self.model, batch)
        keys = pair_keys(batch)
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise RuntimeError(f'{len(missing)} pairs of this batch are not in the precomputed reference '
                               f'log-probabilities (first prompt: {batch["prompt"][0][:80]!r})')
        device = batch['chosen_input_ids'].device
        values = torch.tensor([self.cache[k] for k in keys], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]

    def precompute(self, batches: Iterable[Dict], path: Path, local: Callable[[Dict], Dict],
                   gather: Callable[[torch.Tensor], torch.Tensor], is_main: bool, save_every_secs: float = 300) -> None:
        """One pass of the reference model over `batches` (whole over ranks), then free it. Collective.

        The log-probabilities are cached per pair (keyed by a hash of its prompt, chosen and rejected
        texts) at `path` (`reference_cache_path`), so later runs on the same data skip the pass, and a
        different seed or n_examples computes only the pairs it lacks. Each data-parallel rank computes its
        slice of a batch (`local`) and all ranks `gather` the whole (tensor-parallel ranks all compute the
        whole batch); rank 0 reads the file and sends it to the others, and writes it atomically (every
        `save_every_secs` during the pass, so a killed run loses at most that much work, and at the end, while
        the others wait).
        """
        cache = load_reference_cache(path) if is_main else None
        if dist.is_initialized():
            shared = [cache]
            dist.broadcast_object_list(shared, src=0)
            cache = shared[0]
        n_cached = n_saved = len(cache)
        saving, last_save = is_main, time.monotonic()
        for batch in tqdm.tqdm(batches, desc='Reference log-probabilities', disable=not is_main, leave=False):
            keys = pair_keys(batch)
            if all(k in cache for k in keys):
                continue
            with torch.no_grad(), self.active():
                chosen, rejected = self.forward(self.model, local(batch))
            pairs = torch.stack([gather(chosen), gather(rejected)], dim=1).float().cpu().tolist()
            cache.update(zip(keys, pairs))
            if saving and time.monotonic() - last_save >= save_every_secs:
                saving, last_save, n_saved = save_reference_cache(cache, path), time.monotonic(), len(cache)
        if saving and len(cache) > n_saved:
            save_reference_cache(cache, path)
        barrier()  # the file is complete before any rank goes on (and, say, starts the next run)
        rank0_print(f'reference log-probabilities of {len(cache)} pairs ({len(cache) - n_cached} computed now) '
                    f'in {path}; ' + ('the reference model is freed' if self.switch is None else
                                      'the policy no longer runs as the reference'))
        self.cache = cache
        self.model = None
