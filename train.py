"""Train a language model with SFT, then DPO / IPO / conservative DPO / β-DPO. Configured with Hydra.

    # the embedded default: a tiny GPT-NeoX and a generated task, on CPU, in about a minute, no downloads
    python train.py

    # stage 1, supervised fine-tuning on the preferred responses
    python train.py model=pythia28 datasets=[hh] loss=sft exp_name=anthropic_dpo_pythia28 \
        gradient_accumulation_steps=2 batch_size=64 eval_batch_size=32 trainer=FSDPTrainer \
        sample_during_eval=false model.fsdp_policy_mp=bfloat16

    # LoRA: only rank-16 adapters train; DPO's reference is the same weights with the adapters off
    python train.py loss=sft lora.r=16
    python train.py loss=dpo loss.beta=0.1 lora.r=16 model.archive=.cache/$USER/tiny_sft_<timestamp>/LATEST/policy.pt

    # stage 2, β-DPO from the SFT weights (ρ = mode_weight, α = a)
    python train.py model=pythia28 datasets=[hh] loss=dpo loss.beta=0.1 exp_name=anthropic_beta_dpo_pythia28 \
        gradient_accumulation_steps=2 batch_size=64 eval_batch_size=32 trainer=FSDPTrainer \
        sample_during_eval=false model.fsdp_policy_mp=bfloat16 \
        model.archive=/path/to/sft_run/LATEST/policy.pt loss.mode_loss=beta_DPO loss.mode_weight=0.2 loss.a=0.6

    # FSDP in 2 CPU processes (gloo), to try a distributed run without GPUs (one process per GPU on GPUs)
    python train.py trainer=FSDPTrainer n_cpu_processes=2

    # several nodes: one torchrun per node; ranks come from the launcher
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        train.py trainer=FSDPTrainer ...
"""
import contextlib
import functools
import os
import socket
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import trainers
from allocator import set_malloc_mmap_threshold
from checkpoints import atomic_write_text, removed_if_unused, resume_changes
from config_schema import unknown_key_problems, validate_config
from distributed import (DistributedSetup, Parallelism, decide_parallelism, init_distributed, launch, precision_warnings,
                         rank0_result)
from lora import lora_enabled
from losses import LossMode
from models import build_models, materialize_in_turn
from utils import DummyWandb, UserError, exits_on_user_error, get_local_dir, get_local_run_dir, rank0_print

def register_resolvers() -> None:
    """The config's own interpolation `${get_local_run_dir:...}` (a new timestamped run directory)."""
    OmegaConf.register_new_resolver('get_local_run_dir', get_local_run_dir, replace=True)


def init_wandb(config: DictConfig, rank: int):
    """A wandb run on rank 0 when enabled, else a stand-in; never blocks or crashes for lack of a login."""
    if not config.wandb.enabled or config.debug or rank != 0:
        return DummyWandb()
    import wandb
    wandb_dir = get_local_dir(config.local_dirs)
    os.makedirs(wandb_dir, exist_ok=True)
    mode = os.environ.get('WANDB_MODE')
    offline_note = (f'logging offline under {wandb_dir}/wandb; upload later with `wandb sync '
                    f'{wandb_dir}/wandb/offline-run-*` (wandb.enabled=false turns this off)')
    if mode is None and not wandb_logged_in():
        mode = 'offline'
        print(f'wandb: no login found (run `wandb login`), {offline_note}')
    elif mode is None and not reachable(wandb.setup().settings.base_url, WANDB_PROBE_SECS):
        mode = 'offline'
        print(f'wandb: cannot reach {wandb.setup().settings.base_url} within {WANDB_PROBE_SECS} s, {offline_note}')
    try:
        return wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                          config=OmegaConf.to_container(config, resolve=True), dir=wandb_dir, mode=mode,
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as e:
        print(f'wandb could not start ({type(e).__name__}: {e}); continuing without wandb')
        return DummyWandb()


# An online wandb.init without a network retries for its init_timeout (60 s here) before it gives up; a server
# that does not answer a plain connection within this many seconds sends the run offline at once instead.
WANDB_PROBE_SECS = 5


def reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to `url`'s host and port opens within `timeout` seconds, name lookup included (run in
    a thread: the lookup itself has no timeout)."""
    parsed = urllib.parse.urlparse(url)
    address = (parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 80))
    opened = []

    def connect():
        with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout):
            opened.append(True)
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def wandb_logged_in() -> bool:
    """Whether an API key is available (environment or ~/.netrc), without contacting the server."""
    if os.environ.get('WANDB_API_KEY'):
        return True
    import netrc
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any('wandb' in host for host in hosts)


def build_run_models(config: DictConfig, parallelism: Parallelism, setup: Optional[DistributedSetup] = None):
    """This process's (policy, reference or None): whole on rank 0 (or alone), empty on the other ranks of a
    sharded run, which receive rank 0's weights once the models are split. With LoRA the DPO family's reference
    is the policy with its adapters disabled, so no reference model is built."""
    with_reference = LossMode.from_config(config.loss).uses_reference_model and not lora_enabled(config)
    set_cpu_allocator(config)
    return build_models(config, parallelism, with_reference, empty=setup is not None and setup.rank != 0)


def set_cpu_allocator(config: DictConfig) -> None:
    """cpu_malloc_mmap_threshold: glibc malloc's fixed mmap threshold, set before the models load on a machine without
    CUDA (allocator.py; there the CUDA caching allocator holds the tensors, and host malloc is left alone)."""
    if torch.cuda.is_available():
        return
    note = set_malloc_mmap_threshold(config.cpu_malloc_mmap_threshold)
    if note is not None and config.debug:
        rank0_print(note)


def set_tf32(enabled: bool) -> None:
    """allow_tf32: float32 matmuls and convolutions on Ampere-or-newer GPUs may use TF32 tensor cores (the
    original sets torch.backends.cuda.matmul.allow_tf32 = True on import; cuDNN's flag is PyTorch's default
    already). Per process: spawned processes do not inherit it."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def run_trainer(config: DictConfig, parallelism: Parallelism, policy: nn.Module,
                reference_model: Optional[nn.Module] = None, setup: Optional[DistributedSetup] = None) -> None:
    """Run the trainer of `parallelism` on these models in this process (rank 0 of 1 without `setup`)."""
    set_tf32(config.allow_tf32)
    rank, world_size, device = (setup.rank, setup.world_size, setup.device) if setup else (0, 1, None)
    wandb_run = init_wandb(config, rank)
    trainer = getattr(trainers, parallelism.trainer)(
        policy, config, config.seed, config.local_run_dir, reference_model=reference_model, rank=rank,
        world_size=world_size, wandb_run=wandb_run, device=device)
    # The trainer holds the only reference, so precompute_ref_log_probs can free the model.
    del reference_model
    trainer.train()
    wandb_run.finish()


def sharded_worker(config: DictConfig, setup: DistributedSetup, parallelism: Parallelism) -> None:
    """One process of an FSDP / tensor-parallel run (distributed.launch calls it inside the process group)."""
    materialize_in_turn(config, setup)
    # No local name for the models: with precompute_ref_log_probs the trainer frees the reference.
    run_trainer(config, parallelism, *build_run_models(config, parallelism, setup), setup=setup)


def prepare_run(config: DictConfig) -> Parallelism:
    """Validate the config (every problem at once), resolve it, and write RUN_DIR/config.yaml.

    Under torchrun every process runs this: they join the process group here, and rank 0's run
    directory becomes everyone's.
    """
    register_resolvers()
    problems = validate_config(config)
    if problems:
        raise UserError('invalid config:\n  - ' + '\n  - '.join(problems))
    for warning in precision_warnings(config):
        rank0_print(f'WARNING: {warning}')
    parallelism = decide_parallelism(config)
    if parallelism.launcher == 'torchrun':
        init_distributed(timeout_secs=config.collective_timeout_secs)
    if config.resume_from is not None:
        config.local_run_dir = str(Path(config.resume_from).resolve())
    share_run_dir(config)
    OmegaConf.resolve(config)
    if config.eval_every % config.batch_size != 0:
        rank0_print(f'WARNING: eval_every ({config.eval_every}) is not divisible by batch_size; using '
                    f'{config.eval_every - config.eval_every % config.batch_size}')
        config.eval_every = max(config.batch_size, config.eval_every - config.eval_every % config.batch_size)
    if config.resume_from is not None:
        # rank 0's: the resumed run's config.yaml is on its disk only when the nodes share none
        changed = rank0_result(lambda: resume_changes(config, Path(config.local_run_dir) / 'config.yaml'))
        if changed:
            raise UserError(f'resume_from={config.resume_from}: the run was started with different settings, so it '
                             f'cannot continue exactly:\n  - ' + '\n  - '.join(changed) +
                             f'\nPass the values of {config.local_run_dir}/config.yaml, or start a new run with '
                             f'model.archive={config.local_run_dir}/LATEST/policy.pt')
    if dist.is_initialized():
        dist.barrier()  # every rank has read the resumed run's config.yaml before rank 0 rewrites it
        if dist.get_rank() != 0:
            return parallelism
    atomic_write_text(Path(config.local_run_dir) / 'config.yaml', OmegaConf.to_yaml(config))
    return parallelism


def share_run_dir(config: DictConfig) -> None:
    """Under torchrun, set config.local_run_dir to rank 0's: only rank 0 resolves (and creates) it."""
    if not dist.is_initialized():
        return
    run_dir = [config.local_run_dir if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run_dir, src=0)
    config.local_run_dir = run_dir[0]


def starting_point_note(config: DictConfig) -> Optional[str]:
    """A note when a preference run starts from the base model rather than an SFT run: legitimate, rarely meant."""
    if config.loss.name == 'sft' or config.model.archive is not None or config.resume_from is not None:
        return None
    return (f'note: model.archive is null, so {config.loss.name} starts from the base model '
            f'{config.model.name_or_path}, not from an SFT run; pass model.archive=SFT_RUN_DIR/LATEST/policy.pt to '
            f'start from one (the reference is the same starting weights either way)')


def finished_run_note(run_dir: Path) -> Optional[str]:
    """The line to paste into the next stage's command, once the run has a checkpoint."""
    archive = run_dir / 'LATEST' / 'policy.pt'
    return f'To train from this run: model.archive={archive}' if archive.is_file() else None


@hydra.main(version_base=None, config_path='config', config_name='config')
@exits_on_user_error
def main(config: DictConfig) -> None:
    parallelism = prepare_run(config)
    run_dir = Path(config.local_run_dir).resolve()
    rank0_print(OmegaConf.to_yaml(config))
    rank0_print('=' * 80)
    rank0_print(f'Writing to {run_dir}')
    rank0_print('=' * 80)
    note = starting_point_note(config)
    if note:
        rank0_print(note)
    with removed_if_unused(config.local_run_dir, new_run=config.resume_from is None):
        if parallelism.sharded:
            launch(config, parallelism, functools.partial(sharded_worker, parallelism=parallelism))
        else:
            # No local name for the models: with precompute_ref_log_probs the trainer frees the reference.
            run_trainer(config, parallelism, *build_run_models(config, parallelism))
    note = finished_run_note(run_dir)
    if note and not dist.is_initialized():
        rank0_print(note)


def command_line_problems(overrides: Sequence[str]) -> List[str]:
    """Overrides of keys train.py's config does not have, each with the closest known key. Hydra would refuse
    `loss.mode_los=beta_DPO` with a hint to add the key (`+loss.mode_los=beta_DPO`), and that trains plain DPO
    without a word: every key here is declared in config/, so neither form is ever needed, and both are refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from config_schema import CONFIG_DIR, TRAIN_SCHEMA, loss_schema
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # a syntax error: Hydra's own message says where
        return []
    # the defaults list as plain Python: its entries are DictConfigs, which are no dict (isinstance(entry, dict) found
    # none, and `loss=simpo loss.gamma=0.5` was checked against DPO's keys and refused)
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / 'config.yaml').defaults)
    groups = {key: value for entry in defaults if isinstance(entry, dict) for key, value in entry.items()}
    groups.update({o.key_or_group: o.value() for o in parsed if o.key_or_group in groups})
    known = {**TRAIN_SCHEMA, **{f'loss.{key}': rule for key, rule in loss_schema(groups.get('loss')).items()}}
    keys = [o.key_or_group for o in parsed if not o.is_delete() and o.key_or_group not in groups
            and not o.key_or_group.startswith('hydra')]
    # a whole group of keys (synthetic={...}, lora={...}) is checked key by key after composition
    return unknown_key_problems([k for k in keys if not any(name.startswith(k + '.') for name in known)], known)


@exits_on_user_error
def check_command_line(overrides: Sequence[str]) -> None:
    problems = command_line_problems(overrides)
    if problems:
        raise UserError('invalid config:\n  - ' + '\n  - '.join(problems))


if __name__ == '__main__':
    check_command_line(sys.argv[1:])
    main()
