"""Train a language model with SFT, then DPO / IPO / conservative DPO / β-DPO. Configured with Hydra.

    # the embedded default: a tiny GPT-NeoX and a generated task, on CPU, in about a minute, no downloads
    python train.py

    # stage 1, supervised fine-tuning on the preferred responses
    python train.py model=pythia28 datasets=[hh] loss=sft exp_name=anthropic_dpo_pythia28 \
        gradient_accumulation_steps=2 batch_size=64 eval_batch_size=32 trainer=FSDPTrainer \
        sample_during_eval=false model.fsdp_policy_mp=bfloat16

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
import os
import socket
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import hydra
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from utils import (disable_dropout, get_local_dir, get_local_run_dir, get_open_port, init_distributed,
                   launched_by_torchrun, load_checkpoint_file, load_state_dict_checked, rank0_print,
                   removed_if_unused)
from models import materialize_model

OmegaConf.register_new_resolver('get_local_run_dir', get_local_run_dir, replace=True)

TRAINERS = ('BasicTrainer', 'FSDPTrainer', 'TensorParallelTrainer')
LOSSES = ('sft', 'dpo', 'ipo')
MODE_LOSSES = ('mean', 'beta_DPO')


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: DictConfig, n_processes: int = 1) -> List[str]:
    """Every problem with `config`, as messages naming the key and what to do (empty if it is fine).

    Runs before anything is loaded or written, so a mistake costs seconds and leaves no files behind.
    """
    problems = []
    # Validate a copy whose run directory is not resolved: resolving it creates the directory.
    config = config.copy()
    config.local_run_dir = '(not resolved yet)'
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        problems.append(f'missing values for: {", ".join(missing)} (set them on the command line, e.g. {missing[0]}=...)')

    def get(key):
        try:
            return OmegaConf.select(config, key, throw_on_missing=True)
        except Exception:
            return None

    if get('trainer') not in TRAINERS:
        problems.append(f'trainer={get("trainer")!r} is unknown; choose one of {", ".join(TRAINERS)}')
    if get('trainer') == 'BasicTrainer' and int(os.environ.get('WORLD_SIZE', 1)) > 1:
        problems.append(f'trainer=BasicTrainer runs in one process, but the launcher started '
                        f'{os.environ["WORLD_SIZE"]}; use trainer=FSDPTrainer or trainer=TensorParallelTrainer, '
                        f'or start it with python train.py')
    optimizer = get('optimizer')
    if not (isinstance(optimizer, str) and isinstance(getattr(torch.optim, optimizer, None), type)):
        problems.append(f'optimizer={optimizer!r} is not a torch.optim optimizer (e.g. RMSprop, Adam, AdamW)')
    for key in ('lr', 'max_grad_norm'):
        if not (is_number(get(key)) and get(key) > 0):
            problems.append(f'{key}={get(key)!r} must be a positive number')
    for key in ('batch_size', 'eval_batch_size', 'gradient_accumulation_steps', 'eval_every', 'max_length',
                'max_prompt_length'):
        if not (isinstance(get(key), int) and get(key) > 0):
            problems.append(f'{key}={get(key)!r} must be a positive integer')
    batch_size, accumulation = get('batch_size'), get('gradient_accumulation_steps')
    if isinstance(batch_size, int) and isinstance(accumulation, int) and accumulation > 0 \
            and batch_size % (accumulation * n_processes) != 0:
        problems.append(f'batch_size={batch_size} must be divisible by gradient_accumulation_steps ({accumulation}) '
                        f'× processes ({n_processes}) = {accumulation * n_processes}')
    eval_batch_size = get('eval_batch_size')
    if isinstance(eval_batch_size, int) and eval_batch_size % n_processes != 0:
        problems.append(f'eval_batch_size={eval_batch_size} must be divisible by the number of processes ({n_processes})')
    if isinstance(get('max_length'), int) and isinstance(get('max_prompt_length'), int) \
            and get('max_prompt_length') >= get('max_length'):
        problems.append(f'max_prompt_length={get("max_prompt_length")} must be smaller than max_length={get("max_length")}')
    if get('n_epochs') is None and get('n_examples') is None:
        problems.append('set n_epochs or n_examples (both are null)')
    datasets = get('datasets')
    if not datasets or isinstance(datasets, str):
        problems.append(f'datasets={datasets!r} must be a non-empty list, e.g. datasets=[hh]')
    local_dirs = get('local_dirs')
    if not local_dirs or isinstance(local_dirs, str):
        problems.append(f'local_dirs={local_dirs!r} must be a non-empty list of directories, e.g. local_dirs=[.cache]')
    elif not writable(first_existing_or_last(local_dirs)):
        problems.append(f'local_dirs={list(local_dirs)}: cannot write to {first_existing_or_last(local_dirs)} (the '
                        f'first that exists, else the last); set local_dirs=[a directory you can write to]')
    if get('on_nonfinite') not in ('stop', 'skip'):
        problems.append(f'on_nonfinite={get("on_nonfinite")!r} must be stop or skip')

    loss_name = get('loss.name')
    if loss_name not in LOSSES:
        problems.append(f'loss={loss_name!r} is unknown; choose loss=sft, loss=dpo or loss=ipo')
    if loss_name in ('dpo', 'ipo'):
        beta = get('loss.beta')
        if not (is_number(beta) and beta > 0):
            problems.append(f'loss.beta={beta!r} must be a positive number (e.g. loss.beta=0.1)')
        if get('loss.mode_loss') not in MODE_LOSSES:
            problems.append(f'loss.mode_loss={get("loss.mode_loss")!r} is unknown; use mean (plain {loss_name.upper()}) '
                            f'or beta_DPO')
        rho = get('loss.mode_weight')
        if not (is_number(rho) and 0 <= rho < 1):
            problems.append(f'loss.mode_weight={rho!r} (ρ, the fraction of pairs the filter drops) must be in [0, 1)')
        if not is_number(get('loss.a')):
            problems.append(f'loss.a={get("loss.a")!r} (α) must be a number')
        smoothing = get('loss.label_smoothing')
        if not (is_number(smoothing) and 0 <= smoothing < 0.5):
            problems.append(f'loss.label_smoothing={smoothing!r} (ε of conservative DPO) must be in [0, 0.5)')

    buckets = get('length_bucket_batches')
    if buckets is not None and (isinstance(buckets, bool) or not (isinstance(buckets, int) and buckets > 0)):
        problems.append(f'length_bucket_batches={buckets!r} must be a positive integer (e.g. 50) or null')
    chunk_size = get('logps_chunk_size')
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        problems.append(f'logps_chunk_size={chunk_size!r} must be a positive integer (e.g. 1024) or null')
    if get('compile_policy') and get('trainer') == 'TensorParallelTrainer':
        problems.append('compile_policy=true does not work with trainer=TensorParallelTrainer (torch 2.13 fails to '
                        'trace the split model\'s backward pass); use compile_policy=false or trainer=FSDPTrainer')
    autocast = get('policy_autocast')
    if autocast is not None and not isinstance(getattr(torch, str(autocast), None), torch.dtype):
        problems.append(f'policy_autocast={autocast!r} is not a torch dtype (bfloat16, float16) or null')
    for key in ('model.policy_dtype', 'model.reference_dtype'):
        if not isinstance(getattr(torch, str(get(key)), None), torch.dtype):
            problems.append(f'{key}={get(key)!r} is not a torch dtype (float32, bfloat16, float16)')
    if get('model.fsdp_policy_mp') is not None and not isinstance(getattr(torch, str(get('model.fsdp_policy_mp')), None), torch.dtype):
        problems.append(f'model.fsdp_policy_mp={get("model.fsdp_policy_mp")!r} is not a torch dtype')
    archive = get('model.archive')
    if archive is not None and not Path(str(archive)).is_file():
        problems.append(f'model.archive={archive} does not exist; pass the policy.pt of an SFT run '
                        f'(RUN_DIR/LATEST/policy.pt)')
    train_pairs = get('synthetic.train_pairs')
    if train_pairs is not None and not Path(str(train_pairs)).expanduser().is_file():
        problems.append(f'synthetic.train_pairs={train_pairs} does not exist; write it with `python sample_pairs.py '
                        f'SFT_RUN_DIR --out {train_pairs}`, or set synthetic.train_pairs=null for the generated pairs')
    resume_from = get('resume_from')
    if resume_from is not None and not (Path(str(resume_from)) / 'LATEST' / 'policy.pt').is_file():
        problems.append(f'resume_from={resume_from} has no complete checkpoint (no LATEST/policy.pt); pass the run '
                        f'directory of an earlier run')
    return problems


def first_existing_or_last(local_dirs: List[str]) -> Path:
    """The directory under which get_local_dir puts the run and the caches (not created here)."""
    return Path(next((d for d in local_dirs if os.path.exists(d)), local_dirs[-1]))


def writable(path: Path) -> bool:
    """Whether `path` is a writable directory, or could be created as one (its nearest existing ancestor is)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def build_model(config: DictConfig, dtype_name: str, device_map: Optional[str], empty: bool = False) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained of config.model.name_or_path (Hub id, directory, .gguf file or embedded:NAME).

    empty: the same model on the meta device, without weights and without memory (see build_models).
    """
    import transformers
    path = materialize_model(config.model.name_or_path, get_local_dir(config.local_dirs))
    if empty:
        model_config = transformers.AutoConfig.from_pretrained(path, cache_dir=get_local_dir(config.local_dirs))
        with torch.device('meta'):
            model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype_name))
    else:
        kwargs = {'device_map': device_map} if device_map else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, cache_dir=get_local_dir(config.local_dirs), dtype=getattr(torch, dtype_name), **kwargs)
    disable_dropout(model)
    return model


def build_models(config: DictConfig, empty: bool = False) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The policy and, for the DPO family, the frozen reference, with model.archive (or a resume) loaded.

    empty: models without weights on the meta device, for the ranks other than 0 of FSDPTrainer and
    TensorParallelTrainer, which receive rank 0's weights once the models are split (so a machine
    holds one full copy of the model in memory, not one per process).
    """
    multi_gpu_split = config.trainer == 'BasicTrainer' and torch.cuda.device_count() > 1
    device_map = 'balanced' if multi_gpu_split else None
    policy = build_model(config, config.model.policy_dtype, device_map, empty)
    reference_model = None
    if config.loss.name != 'sft':
        reference_model = build_model(config, config.model.reference_dtype, device_map, empty)
        reference_model.requires_grad_(False)
    if empty:
        return policy, reference_model

    if config.model.archive is not None:
        archive = load_checkpoint_file(config.model.archive, 'model.archive')
        rank0_print(f'loading pre-trained weights at step {archive.get("step_idx")} from {config.model.archive}')
        load_state_dict_checked(policy, archive['state'], f'model.archive {config.model.archive}')
        if reference_model is not None:
            load_state_dict_checked(reference_model, archive['state'], f'model.archive {config.model.archive}')
    if config.resume_from is not None:
        checkpoint = Path(config.resume_from) / 'LATEST' / 'policy.pt'
        load_state_dict_checked(policy, load_checkpoint_file(checkpoint, 'resume checkpoint')['state'], str(checkpoint))

    tokenizer_vocab = check_tokenizer_fits(config, policy)
    rank0_print(f'policy: {sum(p.numel() for p in policy.parameters()):,} parameters, tokenizer of {tokenizer_vocab} tokens')
    if not multi_gpu_split and torch.cuda.is_available() and config.trainer == 'BasicTrainer':
        policy.to('cuda')
        if reference_model is not None:
            reference_model.to('cuda')
    return policy, reference_model


def check_tokenizer_fits(config: DictConfig, model: nn.Module) -> int:
    """The tokenizer's size; raises if it has ids the model's embedding cannot look up."""
    from trainers import load_tokenizer
    tokenizer = load_tokenizer(config)
    n_embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embeddings:
        name = config.model.tokenizer_name_or_path or config.model.name_or_path
        raise ValueError(f'the tokenizer {name} has {len(tokenizer)} tokens but the model {config.model.name_or_path} '
                         f'embeds only {n_embeddings}: they do not belong together. Set model.tokenizer_name_or_path '
                         f'to the tokenizer the model was trained with.')
    return len(tokenizer)


def init_wandb(config: DictConfig, rank: int):
    """A wandb run on rank 0 when enabled, else a stand-in; never blocks or crashes for lack of a login."""
    from trainers import DummyWandb
    if not config.wandb.enabled or config.debug or rank != 0:
        return DummyWandb()
    import wandb
    wandb_dir = get_local_dir(config.local_dirs)
    os.makedirs(wandb_dir, exist_ok=True)
    mode = os.environ.get('WANDB_MODE')
    if mode is None and not wandb_logged_in():
        mode = 'offline'
        print(f'wandb: no login found, logging offline under {wandb_dir}/wandb; upload later with '
              f'`wandb sync {wandb_dir}/wandb/offline-run-*` (or run `wandb login`; wandb.enabled=false turns this off)')
    try:
        return wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                          config=OmegaConf.to_container(config, resolve=True), dir=wandb_dir, mode=mode,
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as e:
        print(f'wandb could not start ({type(e).__name__}: {e}); continuing without wandb')
        return DummyWandb()


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


def worker_main(rank: int, world_size: int, config: DictConfig, policy: nn.Module,
                reference_model: Optional[nn.Module] = None, device: Optional[torch.device] = None) -> None:
    """Run the trainer named by config.trainer in this process."""
    import trainers
    wandb_run = init_wandb(config, rank)
    trainer_class = getattr(trainers, config.trainer)
    trainer = trainer_class(policy, config, config.seed, config.local_run_dir, reference_model=reference_model,
                            rank=rank, world_size=world_size, wandb_run=wandb_run, device=device)
    # The trainer holds the only reference, so precompute_ref_log_probs can free the model.
    del reference_model
    trainer.train()
    wandb_run.finish()


def launch_distributed(config: DictConfig) -> None:
    """Run FSDPTrainer / TensorParallelTrainer: in this process under torchrun (which started the others),
    else in one new process per GPU (per n_cpu_processes on CPU) on this machine."""
    if dist.is_initialized():
        distributed_worker(None, None, config)
        return
    import torch.multiprocessing as mp
    world_size = count_processes(config)
    port = config.fsdp_port or get_open_port()
    rank0_print(f'starting {world_size} processes ({config.trainer})')
    mp.spawn(distributed_worker, args=(world_size, config, port), nprocs=world_size, join=True)


def distributed_worker(rank: Optional[int], world_size: Optional[int], config: DictConfig,
                       port: Optional[int] = None) -> None:
    """One process of a distributed run: join the group, build the models (whole on rank 0 only), train."""
    setup = init_distributed(rank, world_size, port)
    try:
        materialize_in_turn(config, setup)
        # No local name for the models: with precompute_ref_log_probs the trainer frees the reference.
        worker_main(setup.rank, setup.world_size, config, *build_models(config, empty=setup.rank != 0),
                    device=setup.device)
    finally:
        dist.destroy_process_group()


def materialize_in_turn(config: DictConfig, setup) -> None:
    """Write the embedded model (embedded:NAME) or a GGUF conversion (models.py) before any process reads it: rank 0
    first, then the first process of each other machine (in case they share no disk)."""
    for writes in (setup.rank == 0, setup.local_rank == 0):
        if writes:
            materialize_model(config.model.name_or_path, get_local_dir(config.local_dirs))
        dist.barrier()


def count_processes(config: DictConfig) -> int:
    """Processes the run will use: 1 for BasicTrainer; else the launcher's WORLD_SIZE, the GPUs, or n_cpu_processes."""
    if config.trainer == 'BasicTrainer':
        return 1
    if 'WORLD_SIZE' in os.environ:
        return int(os.environ['WORLD_SIZE'])
    return torch.cuda.device_count() or int(config.n_cpu_processes)


def prepare_run(config: DictConfig) -> None:
    """Validate the config (every problem at once), resolve it, and write RUN_DIR/config.yaml.

    Under torchrun every process runs this: they join the process group here, and rank 0's run
    directory becomes everyone's.
    """
    data_parallel = count_processes(config) if config.trainer == 'FSDPTrainer' else 1
    problems = validate_config(config, data_parallel)
    if problems:
        raise ValueError('invalid config:\n  - ' + '\n  - '.join(problems))
    if config.trainer != 'BasicTrainer' and launched_by_torchrun():
        init_distributed()
    if config.resume_from is not None:
        config.local_run_dir = str(Path(config.resume_from).resolve())
    share_run_dir(config)
    OmegaConf.resolve(config)
    if config.eval_every % config.batch_size != 0:
        rank0_print(f'WARNING: eval_every ({config.eval_every}) is not divisible by batch_size; using '
                    f'{config.eval_every - config.eval_every % config.batch_size}')
        config.eval_every = max(config.batch_size, config.eval_every - config.eval_every % config.batch_size)
    if config.resume_from is not None:
        changed = resume_changes(config, Path(config.local_run_dir) / 'config.yaml')
        if changed:
            raise ValueError(f'resume_from={config.resume_from}: the run was started with different settings, so it '
                             f'cannot continue exactly:\n  - ' + '\n  - '.join(changed) +
                             f'\nPass the values of {config.local_run_dir}/config.yaml, or start a new run with '
                             f'model.archive={config.local_run_dir}/LATEST/policy.pt')
    if dist.is_initialized():
        dist.barrier()  # every rank has read the resumed run's config.yaml before rank 0 rewrites it
        if dist.get_rank() != 0:
            return
    os.makedirs(config.local_run_dir, exist_ok=True)
    with open(os.path.join(config.local_run_dir, 'config.yaml'), 'w') as f:
        OmegaConf.save(config, f)


def share_run_dir(config: DictConfig) -> None:
    """Under torchrun, set config.local_run_dir to rank 0's: only rank 0 resolves (and creates) it."""
    if not dist.is_initialized():
        return
    run_dir = [config.local_run_dir if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(run_dir, src=0)
    config.local_run_dir = run_dir[0]


# Keys a resumed run may change: where things go, how long to train, logging and evaluation. Every
# other key (seed, batch sizes, lr, loss, model, data, ...) decides the training stream and must match.
RESUMABLE_CHANGES = ('resume_from', 'local_run_dir', 'local_dirs', 'exp_name', 'n_epochs', 'n_examples', 'wandb',
                     'debug', 'minimum_log_interval_secs', 'sample_during_eval', 'n_eval_model_samples',
                     'n_eval_examples', 'eval_batch_size', 'eval_every', 'do_first_eval', 'on_nonfinite', 'fsdp_port',
                     'n_cpu_processes', 'trainer', 'activation_checkpointing', 'model.fsdp_policy_mp', 'hydra')


def resume_changes(config: DictConfig, saved_config_path: Path) -> List[str]:
    """'key: was X, now Y' for each setting that differs from the run being resumed (none if it has no config.yaml)."""
    if not saved_config_path.is_file():
        return []
    saved = flat_items(OmegaConf.to_container(OmegaConf.load(saved_config_path), resolve=False))
    now = flat_items(OmegaConf.to_container(config, resolve=True))
    return [f'{key}: was {saved[key]!r}, now {now[key]!r}' for key in sorted(saved.keys() & now.keys())
            if saved[key] != now[key] and not any(key == k or key.startswith(k + '.') for k in RESUMABLE_CHANGES)]


def flat_items(tree, prefix: str = '') -> dict:
    """{'loss.beta': 0.1, ...} from a nested dict."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    items = {}
    for key, value in tree.items():
        items.update(flat_items(value, f'{prefix}.{key}' if prefix else str(key)))
    return items


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig) -> None:
    prepare_run(config)
    rank0_print(OmegaConf.to_yaml(config))
    rank0_print('=' * 80)
    rank0_print(f'Writing to {socket.gethostname()}:{config.local_run_dir}')
    rank0_print('=' * 80)
    with removed_if_unused(config.local_run_dir, new_run=config.resume_from is None):
        if config.trainer == 'BasicTrainer':
            # No local name for the models: with precompute_ref_log_probs the trainer frees the reference.
            worker_main(0, 1, config, *build_models(config))
        else:
            launch_distributed(config)


if __name__ == '__main__':
    main()
