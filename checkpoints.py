"""Everything written into or read back from a run directory, and the one atomic writer of the project.

    RUN_DIR/config.yaml             the resolved config (train.py)
    RUN_DIR/metrics.jsonl           one line per log (trainers.BasicTrainer.log)
    RUN_DIR/step-N/                 policy.pt, optimizer.pt, scheduler.pt ({'step_idx', 'state', 'metrics'},
                                    as the original), trainer_state.pt, beta_dpo_stats.json
    RUN_DIR/LATEST -> step-N        always a complete checkpoint; model.archive=RUN_DIR/LATEST/policy.pt
    RUN_DIR/hf_model/               the final policy for from_pretrained / vLLM (LoRA: merged; adapter/ beside it),
                                    with training_options.json (render_hh_with_chat_template, for evaluate.py)

    from checkpoints import atomic_path, save_checkpoint, load_checkpoint_file
    with atomic_path(run_dir / 'step-64', directory=True) as tmp:   # complete or absent, never half-written
        torch.save(state, tmp / 'policy.pt')

A trainer saves, resumes and exports through `TrainerCheckpointing` (at the end of this file), which
trainers.BasicTrainer inherits.

Every file the project writes goes through `atomic_path`: a temporary sibling, flushed to disk, then
renamed into place, so a process killed at any moment (SIGKILL, preemption, power loss) leaves either the
old file or the new one.
"""
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf

from lora import archive_info, merged_export, trainable_state
from utils import UserError, barrier, rank0_print, unwrap


def fsync_dir(path: Union[str, Path]) -> None:
    """Flush a directory entry to disk so a rename into it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(OSError, UserError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT); the message names the directory, the space
    needed and the space free, and says what was kept. A UserError: the entry points print it without a traceback."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def disk_full_cause(error: BaseException) -> Optional[BaseException]:
    """The exception in `error`'s chain that says the disk or the quota is full, if any.

    torch.save into a file object reports it as `RuntimeError: [enforce fail at inline_container.cc]` with the
    OSError chained; safetensors as a SafetensorError whose text ends `(os error 28)`.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if any(text in str(error) for text in ('No space left on device', 'Disk quota exceeded', 'os error 28')):
            return error
        error = error.__cause__ or error.__context__
    return None


def human_bytes(n: float) -> str:
    for unit in ('bytes', 'KB', 'MB', 'GB', 'TB'):
        if n < 1000 or unit == 'TB':
            return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
        n /= 1000


def size_on_disk(path: Path) -> int:
    """Bytes of the file `path`, or of every file under the directory `path` (0 if absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) if path.is_dir() else 0


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def explained_if_disk_full(target: Path, needed_bytes: Optional[int] = None,
                           written: Callable[[], int] = lambda: 0) -> Iterator[None]:
    """Turn a full disk inside into a DiskFullError naming the directory of `target`, the space needed
    (`needed_bytes`, the caller's estimate, else more than `written()`, the bytes written before the disk filled)
    and the space free now. The project's one place that recognises a full disk (atomic_path, metrics.jsonl, LATEST)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        cause = disk_full_cause(e)
        if cause is None:
            raise
        needed = (f'needs about {human_bytes(needed_bytes)}' if needed_bytes else
                  f'needs more than the {human_bytes(written())} written before the disk filled' if written() else
                  'needs more space')
        raise DiskFullError(
            f'No space left in {target.parent}: writing {target.name} {needed}, and {human_bytes(free_bytes(target.parent))} '
            f'is free there now ({type(cause).__name__}: {str(cause).splitlines()[0][:120]}). {target} was left as it '
            f'was (the previous version, or absent).') from None


@contextlib.contextmanager
def atomic_path(final: Union[str, Path], directory: bool = False, needed_bytes: Optional[int] = None,
                replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final` to write into; on success, flush it to disk and rename it to `final`.

    directory=True yields a new empty directory (a checkpoint), else a file path. `final` then either does
    not exist or is complete: a process killed at any moment never leaves a half-written file or
    checkpoint under the final name, and a previous `final` is replaced only once the new one is complete.
    On an exception inside, the temporary path is removed and `final` is untouched; a full disk becomes a
    DiskFullError (`explained_if_disk_full`; `needed_bytes`: the caller's estimate of the size). replace=False
    (directories only, for caches whose content is decided by their name): if another process renamed its
    `final` into place first, that one is kept and this one discarded, so a reader of `final` never sees it
    vanish between the two renames of a replacement.
    """
    final = Path(final)
    written = [0]
    with explained_if_disk_full(final, needed_bytes, lambda: written[0]):
        with _atomic_path(final, directory, replace, written) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_path(final: Path, directory: bool, replace: bool, written: List[int]) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f'.{final.name}.tmp-'
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; a checkpoint gets the usual permissions
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        for f in (tmp.rglob('*') if directory else [tmp]):
            if f.is_file():
                with open(f, 'rb') as fh:
                    os.fsync(fh.fileno())
        if directory:
            fsync_dir(tmp)
        if directory and not replace:
            try:
                os.rename(tmp, final)  # fails if another process put a complete `final` in place first
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif directory and final.exists():
            old = final.with_name(f'.{final.name}.old-{os.getpid()}')
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        written[0] = size_on_disk(tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path, needed_bytes=len(text.encode())) as tmp:
        tmp.write_text(text)


def torch_save(state: Any, path: Union[str, Path]) -> None:
    """torch.save into a Python file object: its writes raise OSError(ENOSPC) on a full disk, which torch chains
    to its own error (torch.save to a path name reports only `basic_ios::clear: iostream error`)."""
    with open(path, 'wb') as f:
        torch.save(state, f)


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state: about what torch.save of it writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def save_atomically(state: Any, path: Union[str, Path], needed_bytes: Optional[int] = None) -> None:
    """torch.save `state` to `path` atomically (`atomic_path`): a killed run leaves no partial cache. needed_bytes:
    about the size of the file, for the message on a full disk (default: the bytes of the tensors in `state`)."""
    with atomic_path(path, needed_bytes=needed_bytes or tensor_bytes(state) or None) as tmp:
        torch_save(state, tmp)


def point_latest_to(run_dir: Union[str, Path], step_dir_name: str) -> None:
    """Atomically make `run_dir/LATEST` a symbolic link to `run_dir/step_dir_name`.

    The link is created under a temporary name and renamed over the old one, so `LATEST` always
    points to a complete checkpoint. `model.archive=RUN/LATEST/policy.pt` reads through it.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f'.LATEST.tmp-{os.getpid()}'
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    with explained_if_disk_full(run_dir / 'LATEST'):
        os.symlink(step_dir_name, tmp)
    latest = run_dir / 'LATEST'
    if latest.is_dir() and not latest.is_symlink():  # a LATEST directory from an older layout
        shutil.rmtree(latest)
    os.replace(tmp, latest)
    fsync_dir(run_dir)


def kept_checkpoint(run_dir: Union[str, Path]) -> str:
    """What a run that stops now leaves to continue from (for the message that stops it)."""
    latest = Path(run_dir) / 'LATEST'
    return (f'The last checkpoint, {latest.resolve()}, is intact' if latest.exists()
            else f'No checkpoint was written yet to {run_dir}')


def how_to_continue(run_dir: Union[str, Path]) -> str:
    """`kept_checkpoint`, then the command that continues from it (or: start again)."""
    if (Path(run_dir) / 'LATEST').exists():
        return (f'{kept_checkpoint(run_dir)}; continue with:  python train.py <the same arguments> '
                f'resume_from={run_dir}')
    return f'{kept_checkpoint(run_dir)}; start the run again'


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


def unreadable_because(error: Exception) -> str:
    """Why torch.load (weights_only=True) or a check after it refused a cache file, in one line. torch's own text for
    a pickle it refuses goes on to advise weights_only=False, which a damaged or planted cache must never get."""
    if 'Weights only load failed' in str(error) or 'Unsupported global' in str(error):
        return f'{type(error).__name__}: not only tensors and plain containers, so nothing in it was run'
    return f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[0][:200]}'


def load_state_dict_checked(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(state)`, also for archives of older transformers versions, naming what does not fit.

    The original's policy.pt files come from transformers 4.29: their keys are first renamed the way
    `from_pretrained` renames an old checkpoint's (`renamed_for_model`: GPT-NeoX's `embed_out` is `lm_head`
    now), and entries the model no longer has that name none of its weights (`stale_entries`: persistent
    buffers of then, GPT-NeoX's causal mask `attention.bias`, `attention.masked_bias`, the rotary
    `inv_freq`) are left out with a warning naming them. A missing weight, a weight of the wrong shape, or one
    the model has no place for (the archive has more layers) raises ValueError naming the keys.
    """
    state = renamed_for_model(model, state)
    expected = model.state_dict()
    stale = stale_entries(set(state) - set(expected), expected)
    if stale:
        rank0_print(f'WARNING: {source}: ignoring {len(stale)} entries this model does not have (buffers an older '
                    f'transformers version saved): {grouped_by_layer(stale)}')
        state = {k: v for k, v in state.items() if k not in set(stale)}
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


def renamed_for_model(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` with each key the model does not have renamed by transformers' own table of renamed checkpoint
    keys (what `from_pretrained` applies to old checkpoints, e.g. `embed_out.` → `lm_head.` for GPT-NeoX since
    transformers 5); renames only, for a transformers model (anything else is returned as it is)."""
    if not hasattr(model, 'config'):
        return state
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    expected = model.state_dict()
    renamed = {(key if key in expected else rename_source_key(key, renamings, [])[0]): value
               for key, value in state.items()}
    return with_output_head_named_as_model(model, renamed, expected)


def with_output_head_named_as_model(model: torch.nn.Module, state: Dict[str, torch.Tensor],
                                    expected: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` with an output head saved as `lm_head.` or `embed_out.` renamed to this model's name for it: GPT-NeoX's
    head is `embed_out` up to some transformers 5.x and `lm_head` in 5.23, whose renaming table maps old names to
    new only, so an archive of 5.23 loaded under 5.0 would otherwise miss its head."""
    head = model.get_output_embeddings() if hasattr(model, 'get_output_embeddings') else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if name is None:
        return state
    renamed = {}
    for key, value in state.items():
        prefix = key.split('.', 1)[0]
        if key not in expected and prefix in ('lm_head', 'embed_out') and f'{name}.{key.split(".", 1)[1]}' in expected:
            key = f'{name}.{key.split(".", 1)[1]}'
        renamed[key] = value
    return renamed


def layer_pattern(key: str) -> str:
    """`key` with its layer numbers replaced by `*`: 'gpt_neox.layers.3.attention.bias' gives
    'gpt_neox.layers.*.attention.bias'."""
    return re.sub(r'\.\d+\.', '.*.', key)


def stale_entries(unexpected: set, expected: Dict[str, torch.Tensor]) -> List[str]:
    """The keys of `unexpected` that name no weight of the model even in another layer: no key of `expected`
    has the same `layer_pattern`. `gpt_neox.layers.0.attention.bias` (a buffer of transformers 4.29) is stale;
    `gpt_neox.layers.4.attention.dense.bias` in a 4-layer model is a weight of a bigger model, not stale."""
    patterns = {layer_pattern(key) for key in expected}
    return sorted(key for key in unexpected if layer_pattern(key) not in patterns)


def grouped_by_layer(keys: List[str]) -> str:
    """'gpt_neox.layers.*.attention.bias (32 entries), …': each `layer_pattern` of `keys` once, with its count."""
    counts: Dict[str, int] = {}
    for key in keys:
        counts[layer_pattern(key)] = counts.get(layer_pattern(key), 0) + 1
    return ', '.join(f'{pattern} ({n} entries)' if n > 1 else pattern for pattern, n in sorted(counts.items()))


def truncate_metrics_log(path: Path, up_to_example: int) -> None:
    """Drop metrics.jsonl lines logged after `up_to_example` (a resumed run logs them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if parsed(line) is not None and parsed(line).get('counters/examples', 0) <= up_to_example]
    atomic_write_text(path, ''.join(line + '\n' for line in kept))


def parsed(line: str) -> Optional[dict]:
    """A metrics.jsonl line as a dict; None for a blank line or one cut short (a kill or a full disk mid-write)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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


def with_own_implementation(optimizer: torch.optim.Optimizer, state: Dict) -> Dict:
    """`state` (an optimizer state dict) with `optimizer`'s own choice of kernel (fused / foreach).

    load_state_dict would otherwise copy the saving run's choice, and a checkpoint of a fused
    BasicTrainer run resumed under a sharded trainer would ask for fused kernels on DTensors.
    """
    own = {key: optimizer.param_groups[0].get(key) for key in ('fused', 'foreach')}
    groups = [{**group, **{k: v for k, v in own.items() if k in group}} for group in state['param_groups']]
    return {**state, 'param_groups': groups}


# Keys a resumed run may change: where things go, how long to train, logging and evaluation. Every
# other key (seed, batch sizes, lr, loss, model, data, ...) decides the training stream and must match.
RESUMABLE_CHANGES = ('resume_from', 'local_run_dir', 'local_dirs', 'exp_name', 'n_epochs', 'n_examples', 'wandb',
                     'debug', 'minimum_log_interval_secs', 'sample_during_eval', 'n_eval_model_samples',
                     'n_eval_examples', 'eval_batch_size', 'eval_every', 'do_first_eval', 'on_nonfinite', 'fsdp_port',
                     'n_cpu_processes', 'trainer', 'activation_checkpointing', 'model.fsdp_policy_mp', 'hydra',
                     'precompute_save_every_secs', 'collective_timeout_secs', 'trust_remote_code')


def resume_changes(config: DictConfig, saved_config_path: Path) -> List[str]:
    """'key: was X, now Y' for each setting that differs from the run being resumed (none if it has no config.yaml)."""
    if not saved_config_path.is_file():
        return []
    saved = flat_items(OmegaConf.to_container(OmegaConf.load(saved_config_path), resolve=False))
    now = flat_items(OmegaConf.to_container(config, resolve=True))
    # a decaying lr is scheduled over the run's length, so that length is then part of what must not change
    resumable = [k for k in RESUMABLE_CHANGES
                 if now['lr_scheduler'] == 'constant' or k not in ('n_epochs', 'n_examples')]
    return [f'{key}: was {saved[key]!r}, now {now[key]!r}' for key in sorted(saved.keys() & now.keys())
            if saved[key] != now[key] and not any(key == k or key.startswith(k + '.') for k in resumable)]


def flat_items(tree, prefix: str = '') -> dict:
    """{'loss.beta': 0.1, ...} from a nested dict."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    items = {}
    for key, value in tree.items():
        items.update(flat_items(value, f'{prefix}.{key}' if prefix else str(key)))
    return items


class TrainingState(NamedTuple):
    """What `save_checkpoint` wrote besides the policy: the states a resumed run restores."""
    optimizer: Dict
    scheduler: Dict
    trainer_state: Dict


def save_checkpoint(run_dir: Union[str, Path], step: int, metrics: Dict, policy: Dict, optimizer: Dict,
                    scheduler: Dict, trainer_state: Dict, lora: Optional[Dict] = None) -> Path:
    """Write RUN_DIR/step-N/ atomically, then point RUN_DIR/LATEST at it; returns the step directory.

    policy.pt, optimizer.pt and scheduler.pt are {'step_idx', 'state', 'metrics'} as in the original, so
    `model.archive=RUN_DIR/LATEST/policy.pt` starts a DPO run from any trainer's SFT. A LoRA run's policy.pt
    holds the adapter tensors only, and `lora` (lora.archive_info: r, α, the base model and archive) under
    'lora'. trainer_state.pt holds the counters, β-DPO's statistics and the RNG states; beta_dpo_stats.json
    the statistics, readable. DiskFullError (nothing written, the earlier checkpoints intact) says how to continue.
    """
    run_dir = Path(run_dir)
    step_name = f'step-{step}'
    wrap = lambda state: {'step_idx': step, 'state': state, 'metrics': metrics}
    needed = tensor_bytes([policy, optimizer, scheduler, trainer_state])
    try:
        with atomic_path(run_dir / step_name, directory=True, needed_bytes=needed) as tmp:
            torch_save({**wrap(policy), **({'lora': lora} if lora is not None else {})}, tmp / 'policy.pt')
            torch_save(wrap(optimizer), tmp / 'optimizer.pt')
            torch_save(wrap(scheduler), tmp / 'scheduler.pt')
            torch_save(trainer_state, tmp / 'trainer_state.pt')
            (tmp / 'beta_dpo_stats.json').write_text(json.dumps(trainer_state['margin_stats']) + '\n')
    except DiskFullError as e:
        raise DiskFullError(f'{e}\nFree some space there (or move the run to a larger disk). '
                            f'{how_to_continue(run_dir)}') from None
    point_latest_to(run_dir, step_name)
    return run_dir / step_name


def load_training_state(checkpoint_dir: Path) -> TrainingState:
    """The optimizer, scheduler and trainer state of a checkpoint written by `save_checkpoint`."""
    return TrainingState(load_checkpoint_file(checkpoint_dir / 'optimizer.pt', 'optimizer state')['state'],
                         load_checkpoint_file(checkpoint_dir / 'scheduler.pt', 'scheduler state')['state'],
                         load_checkpoint_file(checkpoint_dir / 'trainer_state.pt', 'trainer state'))


def load_training_state_on_rank0(checkpoint_dir: Path) -> TrainingState:
    """`load_training_state` read on rank 0 only, for a sharded run: the other ranks get the scheduler and trainer
    state from rank 0 (small) and an empty optimizer state, which load_gathered_optimizer_state fills shard by shard
    from rank 0's. So the nodes need not share a disk, and a node of 8 processes holds one copy of optimizer.pt
    in memory, not 8 (11 GB each for Pythia-2.8B with AdamW). Collective."""
    from distributed import rank0_result
    read = {}

    def small_parts():
        read['state'] = load_training_state(checkpoint_dir)
        return read['state'].scheduler, read['state'].trainer_state
    scheduler, trainer_state = rank0_result(small_parts)
    return TrainingState(read['state'].optimizer if read else {}, scheduler, trainer_state)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, checkpoint_dir) -> None:
    """A resumed run's scheduler state; ValueError if the checkpoint's schedule (LRSchedule's attributes, saved in
    the state) is not the one this run configured. train.resume_changes refuses the settings that change it; the
    training data (total steps of a decaying schedule) may have."""
    configured = dict(vars(scheduler.lr_lambdas[0]))
    scheduler.load_state_dict(state)
    schedule = vars(scheduler.lr_lambdas[0])
    if schedule != configured:
        raise ValueError(f'resume_from: the checkpoint\'s lr schedule {schedule} differs from this run\'s {configured} '
                         f'(did the training data change?); start a new run from {checkpoint_dir}/policy.pt')


def clean_run_dir_for_resume(run_dir: Path, example_counter: int) -> None:
    """Before a resumed run goes on: drop the metrics logged after its checkpoint (it logs them again) and
    what an interrupted save left behind."""
    truncate_metrics_log(run_dir / 'metrics.jsonl', example_counter)
    for leftover in remove_incomplete_checkpoints(run_dir):
        rank0_print(f'cleaned up {leftover.name}, left by a save of the interrupted run')


def append_metrics(run_dir: Path, split: str, metrics: Dict[str, Any]) -> None:
    """One line {'split': ..., **metrics} appended to RUN_DIR/metrics.jsonl (whole, or not at all on a full disk)."""
    path = run_dir / 'metrics.jsonl'
    line = json.dumps({'split': split, **metrics}) + '\n'
    data = memoryview(line.encode())
    with explained_if_disk_full(path, len(data)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:
                os.ftruncate(fd, start)  # no half line for a resumed run to read
                raise
        finally:
            os.close(fd)


# Beside config.json in hf_model/: the training options a model's users need to feed it as it was trained (today
# {'render_hh_with_chat_template': bool}); from_pretrained and vLLM ignore the file, evaluate.py reads it
# (generation.trained_chat_rendering).
TRAINING_OPTIONS_FILE = 'training_options.json'


def training_options(config: DictConfig) -> Dict[str, Any]:
    """What TRAINING_OPTIONS_FILE records of a run's config."""
    return {'render_hh_with_chat_template': OmegaConf.select(config, 'render_hh_with_chat_template', default=False)
            is True}


def export_hf_model(model: torch.nn.Module, state: Dict[str, torch.Tensor], tokenizer, output_dir: Path,
                    adapter: Optional[Tuple[Dict[str, torch.Tensor], Any]] = None,
                    options: Optional[Dict[str, Any]] = None) -> None:
    """The policy in Hugging Face format (safetensors, config, tokenizer) for from_pretrained / vLLM, atomically.

    adapter: (tensors, peft LoraConfig) of a LoRA run, written beside it in PEFT's format to `adapter/`
    (adapter_config.json, adapter_model.safetensors), for `PeftModel.from_pretrained(base, OUTPUT_DIR/adapter)`;
    `state` is then the merged model's. options: the run's `training_options`, written to TRAINING_OPTIONS_FILE.
    """
    with atomic_path(output_dir, directory=True) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        if options is not None:
            (tmp / TRAINING_OPTIONS_FILE).write_text(json.dumps(options, indent=1) + '\n')
        if adapter is not None:
            from safetensors.torch import save_file
            tensors, adapter_config = adapter
            adapter_config.save_pretrained(tmp / 'adapter')
            save_file(tensors, tmp / 'adapter' / 'adapter_model.safetensors', metadata={'format': 'pt'})


def cuda_rng_devices(processes: int) -> List[int]:
    """The CUDA devices whose random state a checkpoint keeps: in one process every visible device (BasicTrainer's
    device_map='balanced' splits the model over them, and dropout draws on each), with several processes (FSDP, TP:
    one device each) the process's own; none before CUDA is in use (a CPU run)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return list(range(torch.cuda.device_count())) if processes == 1 else [torch.cuda.current_device()]


def cuda_rng_states(devices: List[int]) -> List[torch.Tensor]:
    return [torch.cuda.get_rng_state(device) for device in devices]


def restore_cuda_rng_states(states: List[torch.Tensor], devices: List[int]) -> None:
    """Each of `devices` back to its saved state. Every process restores rank 0's, as for the CPU state: all ranks are
    seeded alike and draw alike, so their states are equal. A checkpoint without CUDA states (a CPU run, or one saved
    before they were kept) leaves the state as seeded; one saved on another number of devices too, with a warning."""
    if not states:
        return
    if len(states) != len(devices):
        rank0_print(f'WARNING: the checkpoint holds the CUDA random state of {len(states)} devices, this run uses '
                    f'{len(devices)}; CUDA random numbers (dropout) continue from the seed, not from the checkpoint')
        return
    for state, device in zip(states, devices):
        torch.cuda.set_rng_state(state, device)


class TrainerCheckpointing:
    """The run-directory side of a trainer (trainers.BasicTrainer inherits it): the checkpoint saved at each
    evaluation, the resume from one, and the final export to hf_model/.

    It reads the trainer's policy, optimizer, scheduler, tokenizer, counters and β-DPO state (`beta_dpo`). The
    sharded trainers override the three hooks that gather and scatter state across processes:
    `policy_state_dict`, `optimizer_state_dict`, `load_optimizer_state_dict`.
    """

    def policy_state_dict(self, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
        """The full policy state dict on rank 0 (sharded subclasses: {} on the other ranks; collective), or only
        its trained tensors (LoRA's adapters)."""
        state = self.policy.state_dict()
        return trainable_state(self.policy, state) if trainable_only else state

    def optimizer_state_dict(self) -> Dict:
        """The optimizer state, keyed by parameter position (sharded subclasses: on rank 0; collective)."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: Dict) -> None:
        self.optimizer.load_state_dict(with_own_implementation(self.optimizer, state))

    def trainer_state(self) -> Dict:
        """What a resumed run needs besides weights and optimizer: counters, β-DPO statistics, RNG states (CPU, and
        CUDA where it is in use: cuda_rng_devices)."""
        return {'example_counter': self.example_counter, 'batch_counter': self.batch_counter,
                'skipped_batches': self.skipped_batches, 'last_eval_example': self.last_eval_example,
                **self.beta_dpo.state_dict(),
                **(self.epsilon_beta.state_dict() if getattr(self, 'epsilon_beta', None) is not None else {}),
                'torch_rng': torch.get_rng_state(),
                'cuda_rng': cuda_rng_states(cuda_rng_devices(self.world_size))}

    def save(self, metrics: Optional[Dict] = None) -> None:
        """RUN_DIR/step-N/ and LATEST (`save_checkpoint`); no-op in debug mode. Collective."""
        if self.config.debug:
            rank0_print('skipping save in debug mode')
            return
        # LoRA: the adapters only (the base weights are the model and archive the run started from)
        policy_state = self.policy_state_dict(trainable_only=self.lora)
        optimizer_state = self.optimizer_state_dict()
        if self.is_main:
            step_dir = save_checkpoint(self.run_dir, self.example_counter, metrics or {}, policy=policy_state,
                                       optimizer=optimizer_state, scheduler=self.scheduler.state_dict(),
                                       trainer_state=self.trainer_state(),
                                       lora=archive_info(self.policy, self.config) if self.lora else None)
            rank0_print(f'saved checkpoint {step_dir}')
        barrier()

    def restore(self, checkpoint_dir: Path) -> None:
        """Continue from `checkpoint_dir` (a resume): optimizer, scheduler, counters, statistics, RNGs.

        The policy weights were loaded by models.build_models before the model was wrapped.
        """
        saved = load_training_state_on_rank0(checkpoint_dir)
        self.load_optimizer_state_dict(saved.optimizer)
        load_scheduler_state(self.scheduler, saved.scheduler, checkpoint_dir)
        state = saved.trainer_state
        self.example_counter = state['example_counter']
        self.batch_counter = state['batch_counter']
        self.skipped_batches = state['skipped_batches']
        self.beta_dpo.load_state_dict(state)
        if getattr(self, 'epsilon_beta', None) is not None:
            self.epsilon_beta.load_state_dict(state)
        torch.set_rng_state(state['torch_rng'])
        restore_cuda_rng_states(state.get('cuda_rng', []), cuda_rng_devices(self.world_size))
        self.last_eval_example = state['last_eval_example']
        if self.is_main:
            clean_run_dir_for_resume(self.run_dir, self.example_counter)
        rank0_print(f'Resumed from {checkpoint_dir.resolve()} at {self.example_counter} examples')

    def export_pretrained(self, output_dir: Path) -> None:
        """The policy in Hugging Face format (`export_hf_model`). Collective.

        LoRA: the merged model (W + (α/r)·B·A, loadable without peft), and the adapter alone in PEFT's format in
        output_dir/adapter/ (lora.merged_export).
        """
        if self.config.debug:
            return
        state = self.policy_state_dict()
        if self.is_main and self.lora:
            model, merged, adapter = merged_export(self.policy, state, self.config)
            export_hf_model(model, merged, self.tokenizer, output_dir, adapter=adapter,
                            options=training_options(self.config))
        elif self.is_main:
            export_hf_model(unwrap(self.policy), state, self.tokenizer, output_dir, options=training_options(self.config))
        rank0_print(f'exported the policy in Hugging Face format to {output_dir}')
        barrier()
