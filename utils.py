"""Small helpers that more than one file needs: user errors, local directories, batch slicing, hashing, signals.

    from utils import UserError, get_local_dir, get_local_run_dir, fingerprint, slice_and_move_batch_for_device
    run_dir = get_local_run_dir('my_exp', ['/scr-ssd', '.cache'])
    key = fingerprint('tokenized', name, split, tokenizer_id)   # the one recipe for cache keys
    raise UserError('model.archive=x.pt does not exist; pass the policy.pt of an SFT run')   # exit 2, no traceback
"""
import datetime
import functools
import getpass
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

# The HH dialogue format (Anthropic/hh-rlhf), which the hh, shp, se and synthetic sources share.
HUMAN = '\n\nHuman:'
ASSISTANT = '\n\nAssistant:'


class UserError(ValueError):
    """A mistake of the user's, in a config value, a path or a data file, or a machine that cannot do what was asked
    (a full disk): its message names the key, file or row and says what to do. The entry points print the message
    alone and exit with status 2 (`exits_on_user_error`); HYDRA_FULL_ERROR=1 shows the traceback too. A ValueError,
    so callers that catch those keep working."""


# The exit status of a user's mistake, as git, pip and litgpt's CLI use it (1 stays for crashes).
USER_ERROR_STATUS = 2


def exits_on_user_error(main: Callable) -> Callable:
    """`main`, with a UserError printed as one message on stderr and exit status 2 instead of a traceback (unless
    HYDRA_FULL_ERROR=1, Hydra's own switch for full tracebacks). Wraps the entry points and the scripts' mains."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if os.environ.get('HYDRA_FULL_ERROR') == '1':
                raise
            print(f'error: {e}', file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_STATUS)
    return wrapper


def rank0_print(*args, **kwargs) -> None:
    """Print only on the process of global rank 0 (every process when not distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """Wait for every process of a distributed run (nothing in one process)."""
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside any wrapper."""
    return getattr(model, 'module', model)


def get_local_dir(prefixes_to_resolve: List[str]) -> str:
    """The first of `prefixes_to_resolve` that exists, or the last one, created (the original's rule).

    The run directory and caches go under `<dir>/<user>`.
    """
    for prefix in prefixes_to_resolve:
        if os.path.exists(prefix):
            return os.path.join(prefix, getpass.getuser())
    os.makedirs(prefixes_to_resolve[-1], exist_ok=True)
    return os.path.join(prefixes_to_resolve[-1], getpass.getuser())


def get_local_run_dir(exp_name: str, local_dirs: List[str]) -> str:
    """A new run directory `<local dir>/<exp_name>_<timestamp>` (created; never one another run created, even one
    started in the same microsecond: that one gets a suffix -2, -3, ...)."""
    now = datetime.datetime.now()
    timestamp = now.strftime('%Y-%m-%d_%H-%M-%S_%f')
    try:
        run_dir = base = os.path.join(get_local_dir(local_dirs), f'{exp_name}_{timestamp}')
        os.makedirs(os.path.dirname(base), exist_ok=True)
        for n in itertools.count(2):
            try:
                os.mkdir(run_dir)
                break
            except FileExistsError:
                run_dir = f'{base}-{n}'
    except OSError as e:
        raise ValueError(f'local_dirs={list(local_dirs)}: cannot create the run directory under {e.filename} '
                         f'({e.strerror}); set local_dirs=[a directory you can write to]') from None
    return run_dir


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: Union[int, float], dim: int = -1) -> torch.Tensor:
    """Right-pad `tensor` along `dim` to `length` with `pad_value` (returned unchanged if long enough)."""
    if tensor.size(dim) >= length:
        return tensor
    pad_size = list(tensor.shape)
    pad_size[dim] = length - tensor.size(dim)
    return torch.cat([tensor, pad_value * torch.ones(*pad_size, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def slice_and_move_batch_for_device(batch: Dict, rank: int, world_size: int, device: Union[str, torch.device]) -> Dict:
    """The `rank`-th of `world_size` equal slices of every entry of `batch`, tensors moved to `device`."""
    chunk_size = len(next(iter(batch.values()))) // world_size
    start, end = chunk_size * rank, chunk_size * (rank + 1)
    sliced = {k: v[start:end] for k, v in batch.items()}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in sliced.items()}


def formatted_dict(d: Dict) -> Dict:
    """Floats rounded to 4 decimals, for printing."""
    return {k: (f'{v:.4g}' if isinstance(v, float) else v) for k, v in d.items()}


def get_block_modules(model: torch.nn.Module, block_class_name: str) -> List[torch.nn.Module]:
    """Every submodule of class `block_class_name` (e.g. GPTNeoXLayer): the units FSDP shards and checkpointing wraps.

    A class or any of its bases counts, because `fully_shard` turns a GPTNeoXLayer into a subclass
    named FSDPGPTNeoXLayer in place.
    """
    blocks = [m for m in model.modules() if any(c.__name__ == block_class_name for c in type(m).__mro__)]
    if not blocks:
        names = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(f'model.block_name={block_class_name!r} is not a module class of this model; '
                         f'classes present: {", ".join(n for n in names if "Layer" in n or "Block" in n) or names}')
    return blocks


def fingerprint(*parts, length: int = 24) -> str:
    """A stable hex hash of `parts` (JSON-serialisable; anything else by its repr): the project's one recipe
    for cache keys (tokenized data, reference log-probabilities, embedded models, pairs)."""
    blob = json.dumps(parts, sort_keys=True, default=repr).encode('utf-8')
    return hashlib.sha256(blob).hexdigest()[:length]


def file_identity(path: Union[str, Path]) -> List:
    """A file's resolved path, size and modification time: changes whenever the file is rewritten."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


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


def extend_metrics(into: Dict[str, List[float]], metrics: Dict[str, List[float]]) -> None:
    """Append each list of `metrics` to the list of the same key in `into`."""
    for key, values in metrics.items():
        into[key].extend(values)


def mean_metrics(metrics: Dict[str, List[float]]) -> Dict[str, float]:
    """The mean of each list."""
    return {key: sum(values) / len(values) for key, values in metrics.items()}


def first_fit(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, first fit in order: each goes into the first bin
    with room for it, or a new one (an item longer than capacity gets a bin of its own). padding_free's rows
    (logps.pack_sequences) and their logged padding share (preference_datasets.padding_counts) both use it."""
    bins: List[List[int]] = []
    room: List[int] = []
    for i, length in enumerate(lengths):
        for b, free in enumerate(room):
            if free >= length:
                bins[b].append(i)
                room[b] -= length
                break
        else:
            bins.append([i])
            room.append(capacity - length)
    return bins
