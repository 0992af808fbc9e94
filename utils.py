"""Small helpers shared by train.py, trainers.py and preference_datasets.py.

    from utils import get_local_dir, get_local_run_dir, pad_to_length, atomic_checkpoint_dir
    run_dir = get_local_run_dir('my_exp', ['/scr-ssd', '.cache'])
"""
import contextlib
import datetime
import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist


def rank0_print(*args, **kwargs) -> None:
    """Print only on the process of global rank 0 (every process when not distributed)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def get_open_port() -> int:
    """A free TCP port on this machine, for the distributed rendezvous."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(('', 0))
        return s.getsockname()[1]


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
    """A new run directory `<local dir>/<exp_name>_<timestamp>` (created)."""
    now = datetime.datetime.now()
    timestamp = now.strftime('%Y-%m-%d_%H-%M-%S_%f')
    try:
        run_dir = os.path.join(get_local_dir(local_dirs), f'{exp_name}_{timestamp}')
        os.makedirs(run_dir, exist_ok=True)
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


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in `model` to 0 (DPO's log-ratios must be deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, 'config', None)
    for name in ('attention_dropout', 'hidden_dropout', 'attn_pdrop', 'resid_pdrop', 'embd_pdrop',
                 'classifier_dropout', 'dropout'):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


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


class DistributedSetup(NamedTuple):
    """Where this process stands in a distributed run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment variables) started this process."""
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


def init_distributed(rank: Optional[int] = None, world_size: Optional[int] = None,
                     port: Optional[int] = None) -> DistributedSetup:
    """Join the process group: the one place that decides rank, world size, device and backend.

    Under torchrun the ranks come from its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); otherwise train.py spawned `world_size` processes on this machine and passes `rank`
    and the rendezvous `port`. GPUs: nccl, one GPU per process (cuda:LOCAL_RANK). CPU: gloo, and the
    machine's cores are divided among its processes (two processes on two cores each with two
    threads run several times slower than with one). Returns the existing setup if already joined.
    """
    if launched_by_torchrun():
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ['LOCAL_RANK'])
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
        init_method = 'env://'
    else:
        if rank is None or world_size is None or port is None:
            raise ValueError('init_distributed: outside torchrun, pass rank, world_size and port')
        local_rank, local_world_size = rank, world_size
        init_method = f'tcp://127.0.0.1:{port}'
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        backend = 'nccl'
    else:
        device = torch.device('cpu')
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        torch.set_num_threads(max(1, cores // local_world_size))
        backend = 'gloo'
    if not dist.is_initialized():
        extra = {'device_id': device} if device.type == 'cuda' else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **extra)
    return DistributedSetup(dist.get_rank(), dist.get_world_size(), local_rank, device)


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable parts, for cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fsync_dir(path: Union[str, Path]) -> None:
    """Flush a directory entry to disk so a rename into it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_checkpoint_dir(final_dir: Union[str, Path]) -> Iterator[Path]:
    """Write a checkpoint into a temporary sibling directory, then rename it into place.

    Every file written inside is flushed to disk before the rename, so `final_dir` either does not
    exist or is complete: a process killed at any moment (SIGKILL, preemption, power loss) never
    leaves a half-written checkpoint under the final name. A previous `final_dir` is replaced only
    once the new one is complete.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{final_dir.name}.tmp-', dir=final_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; a checkpoint gets the usual permissions
    try:
        yield tmp
        for f in tmp.rglob('*'):
            if f.is_file():
                with open(f, 'rb') as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final_dir.exists():
            old = final_dir.with_name(f'.{final_dir.name}.old-{os.getpid()}')
            os.replace(final_dir, old)
            os.replace(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_dir)
        fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def point_latest_to(run_dir: Union[str, Path], step_dir_name: str) -> None:
    """Atomically make `run_dir/LATEST` a symbolic link to `run_dir/step_dir_name`.

    The link is created under a temporary name and renamed over the old one, so `LATEST` always
    points to a complete checkpoint. `model.archive=RUN/LATEST/policy.pt` reads through it.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f'.LATEST.tmp-{os.getpid()}'
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(step_dir_name, tmp)
    latest = run_dir / 'LATEST'
    if latest.is_dir() and not latest.is_symlink():  # a LATEST directory from an older layout
        shutil.rmtree(latest)
    os.replace(tmp, latest)
    fsync_dir(run_dir)


def remove_incomplete_checkpoints(run_dir: Union[str, Path]) -> List[Path]:
    """Delete what a killed save left in `run_dir` (`.step-N.tmp-*`, `.LATEST.tmp-*`, `.step-N.old-*`); returns them.

    Only the run's own process writes there, so on a resume these are certainly abandoned. A
    `.step-N.old-*` whose `step-N` is missing (killed between the two renames of a replacement) is the
    complete old checkpoint: it is renamed back instead.
    """
    leftovers = sorted(p for p in Path(run_dir).glob('.*') if '.tmp-' in p.name or '.old-' in p.name)
    for path in leftovers:
        original = path.with_name(path.name[1:].split('.old-')[0])
        if '.old-' in path.name and not original.exists():
            os.replace(path, original)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


@contextlib.contextmanager
def removed_if_unused(run_dir: Union[str, Path], new_run: bool) -> Iterator[None]:
    """On an exception inside, delete a new run's directory if the run left nothing in it but its config.yaml
    (bad data, archive or tokenizer found after the config was validated), so failed starts leave no empty
    run directories behind. A resumed run's directory, or one holding anything else, is never touched."""
    try:
        yield
    except BaseException:
        path = Path(run_dir)
        if new_run and path.is_dir() and {p.name for p in path.iterdir()} <= {'config.yaml'}:
            shutil.rmtree(path, ignore_errors=True)
            rank0_print(f'removed the run directory {path}: the run failed before writing anything but config.yaml')
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.tmp-', dir=path.parent)
    with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint_file(path: Union[str, Path], what: str = 'checkpoint') -> dict:
    """`torch.load(path, weights_only=True)` with messages a user can act on.

    weights_only=True refuses to unpickle anything but tensors and plain containers, so a
    malicious archive cannot run code (the original called torch.load without it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{what} {path} does not exist; pass the path of a policy.pt written by an SFT run '
                                f'(RUN_DIR/LATEST/policy.pt)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        text = str(e).split('\n')[0]
        if 'Weights only load failed' in str(e) or 'Unsupported global' in str(e):
            raise ValueError(f'{what} {path} contains Python objects other than tensors and was refused '
                             f'(loaded with weights_only=True, nothing in it ran). Only load archives you trust; '
                             f're-save it as a plain state dict. Detail: {text}') from None
        raise ValueError(f'{what} {path} could not be read ({type(e).__name__}: {text}); it is truncated or not a '
                         f'torch checkpoint. Use an earlier checkpoint (step-N/) of the same run.') from None


def load_state_dict_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)` that names the missing and unexpected keys on a mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ', '.join(keys[:5]) + (f' … ({len(keys)} in all)' if len(keys) > 5 else '')
        lines = [f'{source} does not fit the model ({type(model).__name__}):']
        if missing:
            lines.append(f'  missing keys: {show(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys: {show(unexpected)}')
        if wrong_shape:
            lines.append('  wrong shapes: ' + show([f'{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}'
                                                  for k in wrong_shape]))
        lines.append('  Likely cause: the archive was trained with a different model config; use the same '
                     'model=... (and model.name_or_path) as the SFT run that wrote it.')
        raise ValueError('\n'.join(lines))
    model.load_state_dict(state)


# The embedded default model: a small GPT-NeoX (the Pythia architecture) with random weights and a
# byte-level tokenizer, both built here from code, so `python train.py` needs no download. Each preset
# is written once with `save_pretrained` and then loaded through the same `from_pretrained` path as a
# Hub model.
EMBEDDED_MODELS = {
    # Rotary position embedding on all of each head's dimensions (Pythia: a quarter): the synthetic task is
    # position-based copying, and in one 24,576-example SFT run each (AdamW, lr 3e-3, a draft of the task,
    # 64 held-out prompts) this reached 45% gold accuracy against 19% with Pythia's quarter.
    'tiny': dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, rotary_pct=1.0),
    # The size of EleutherAI/pythia-14m (with our 320-token vocabulary instead of 50,304).
    'pythia14m-shape': dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
}
EMBEDDED_PREFIX = 'embedded:'
EOS_TOKEN = '<|endoftext|>'


def build_byte_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0–255) plus `<|endoftext|>` (id 256).

    Any text round-trips exactly, and nothing is learned from data, so the tokenizer is identical on
    every machine. Padding uses the EOS token, as the original does for Pythia.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, model_max_length=2048)


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to the printable character `ch`."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs[cs.index(ord(ch))]


def materialize_embedded_model(name_or_path: str, cache_root: Union[str, Path]) -> str:
    """Turn `embedded:NAME` into a local Hugging Face directory holding that model; other names pass through.

    The directory holds `config.json`, `model.safetensors` (random weights from seed 0) and the
    tokenizer files, written atomically once per preset and reused afterwards.
    """
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f'model.name_or_path={name_or_path!r}: unknown embedded model; choose one of '
                         f'{", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}')
    tokenizer = build_byte_tokenizer()
    config = GPTNeoXConfig(**{**dict(vocab_size=320, max_position_embeddings=2048, rotary_pct=0.25,
                                     use_parallel_residual=True, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0),
                              **EMBEDDED_MODELS[name]})
    target = Path(cache_root) / 'embedded_models' / f'{name}-{fingerprint(config.to_dict(), len(tokenizer))}'
    if (target / 'config.json').exists():
        return str(target)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    with atomic_checkpoint_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def all_gather_if_needed(values: torch.Tensor, rank: int, world_size: int, group=None) -> torch.Tensor:
    """Concatenate the equally shaped `values` of all `world_size` processes along dim 0 (in rank order).

    Used on detached metrics and β-DPO margins only; the result carries no gradient.
    """
    if world_size == 1:
        return values
    values = values.detach().contiguous()
    gathered = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values, group=group)
    return torch.cat(gathered, dim=0)
