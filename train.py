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
import inspect
import math
import os
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Callable, List, Optional

import hydra
import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

import trainers
from checkpoints import atomic_write_text, flat_items, removed_if_unused, resume_changes
from distributed import DistributedSetup, Parallelism, decide_parallelism, init_distributed, launch
from lora import lora_enabled
from models import build_models, materialize_in_turn, model_directory_problems
from optimization import LR_SCHEDULES
from trainers import LossMode
from utils import DummyWandb, get_local_dir, get_local_run_dir, rank0_print

LOSSES = ('sft', 'dpo', 'ipo')
MODE_LOSSES = ('mean', 'beta_DPO')


def register_resolvers() -> None:
    """The config's own interpolation `${get_local_run_dir:...}` (a new timestamped run directory)."""
    OmegaConf.register_new_resolver('get_local_run_dir', get_local_run_dir, replace=True)
    
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_dtype(name) -> bool:
    return isinstance(getattr(torch, str(name), None), torch.dtype)


def validate_config(config: DictConfig) -> List[str]:
    """Every problem with `config`, as messages naming the key and what to do (empty if it is fine).

    Runs before anything is loaded or written, so a mistake costs seconds and leaves no files behind.
    Each config group has its own check below; they all run, so every problem is reported at once.
    """
    # Validate a copy whose run directory is not resolved: resolving it creates the directory.
    config = config.copy()
    config.local_run_dir = '(not resolved yet)'
    missing = sorted(OmegaConf.missing_keys(config))
    problems = [f'missing values for: {", ".join(missing)} (set them on the command line, e.g. {missing[0]}=...)'] \
        if missing else []

    def get(key):
        try:
            return OmegaConf.select(config, key, throw_on_missing=True)
        except Exception:
            return None

    try:
        parallelism = decide_parallelism(config)
    except ValueError as e:
        problems.append(str(e))
        parallelism = None
    for check in (check_parallelism, check_optimization, check_batches, check_data_and_dirs, check_loss,
                  check_loss_switches, check_model, check_lora, check_paths, check_no_secrets):
        # a missing key is reported once, in the line above, not again as an invalid value ('loss.beta=None ...')
        problems += [problem for problem in check(get, parallelism) if problem.split('=', 1)[0] not in missing]
    return problems


def check_parallelism(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = []
    if parallelism is not None and parallelism.tensor_parallel and get('compile_policy'):
        problems.append('compile_policy=true does not work with trainer=TensorParallelTrainer (torch 2.13 fails to trace '
                        'the split model\'s backward pass); use compile_policy=false or trainer=FSDPTrainer')
    timeout = get('collective_timeout_secs')
    if timeout is not None and not (is_number(timeout) and timeout > 0):
        problems.append(f'collective_timeout_secs={timeout!r} must be a positive number of seconds, or null')
    return problems


def check_optimization(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = []
    optimizer = get('optimizer')
    if not (isinstance(optimizer, str) and isinstance(getattr(torch.optim, optimizer, None), type)):
        problems.append(f'optimizer={optimizer!r} is not a torch.optim optimizer (e.g. RMSprop, Adam, AdamW)')
    for key in ('lr', 'max_grad_norm'):
        if not (is_number(get(key)) and get(key) > 0):
            problems.append(f'{key}={get(key)!r} must be a positive number')
    if get('on_nonfinite') not in ('stop', 'skip'):
        problems.append(f'on_nonfinite={get("on_nonfinite")!r} must be stop or skip')
    autocast = get('policy_autocast')
    if autocast is not None and not is_dtype(autocast):
        problems.append(f'policy_autocast={autocast!r} is not a torch dtype (bfloat16, float16) or null')
    if not (is_number(get('precompute_save_every_secs')) and get('precompute_save_every_secs') >= 0):
        problems.append(f'precompute_save_every_secs={get("precompute_save_every_secs")!r} must be a number of seconds ≥ 0')
    chunk_size = get('logps_chunk_size')
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        problems.append(f'logps_chunk_size={chunk_size!r} must be a positive integer (e.g. 1024) or null')
    if get('lr_scheduler') not in LR_SCHEDULES:
        problems.append(f'lr_scheduler={get("lr_scheduler")!r} is unknown; choose one of '
                        f'{", ".join(LR_SCHEDULES)}')
    weight_decay, optimizer_class = get('weight_decay'), getattr(torch.optim, str(optimizer), None)
    if weight_decay is not None and not (is_number(weight_decay) and weight_decay >= 0):
        problems.append(f'weight_decay={weight_decay!r} must be a number ≥ 0, or null for the optimizer\'s default')
    elif weight_decay is not None and isinstance(optimizer_class, type) \
            and 'weight_decay' not in inspect.signature(optimizer_class).parameters:
        problems.append(f'weight_decay={weight_decay!r}: optimizer={optimizer} has no weight decay; set '
                        f'weight_decay=null')
    return problems


def check_batches(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = []
    for key in ('batch_size', 'eval_batch_size', 'gradient_accumulation_steps', 'eval_every', 'max_length',
                'max_prompt_length'):
        if not (isinstance(get(key), int) and get(key) > 0):
            problems.append(f'{key}={get(key)!r} must be a positive integer')
    n_processes = parallelism.data_parallel_size if parallelism is not None else 1
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
    buckets = get('length_bucket_batches')
    if buckets is not None and (isinstance(buckets, bool) or not (isinstance(buckets, int) and buckets > 0)):
        problems.append(f'length_bucket_batches={buckets!r} must be a positive integer (e.g. 50) or null')
    return problems


def check_data_and_dirs(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = []
    datasets = get('datasets')
    if not datasets or isinstance(datasets, str):
        problems.append(f'datasets={datasets!r} must be a non-empty list, e.g. datasets=[hh]')
    local_dirs = get('local_dirs')
    if not local_dirs or isinstance(local_dirs, str):
        problems.append(f'local_dirs={local_dirs!r} must be a non-empty list of directories, e.g. local_dirs=[.cache]')
    elif not writable(first_existing_or_last(local_dirs)):
        problems.append(f'local_dirs={list(local_dirs)}: cannot write to {first_existing_or_last(local_dirs)} (the '
                        f'first that exists, else the last); set local_dirs=[a directory you can write to]')
    return problems


def check_loss(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    loss_name = get('loss.name')
    if loss_name not in LOSSES:
        return [f'loss={loss_name!r} is unknown; choose loss=sft, loss=dpo or loss=ipo']
    if loss_name == 'sft':
        return []
    problems = []
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
    return problems


def check_loss_switches(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    """The switches of config/loss/{dpo,ipo}.yaml: the loss type, RPO, length normalisation, β-DPO's ablations."""
    loss_name = get('loss.name')
    if loss_name not in ('dpo', 'ipo'):
        return []
    problems = []
    loss_type = get('loss.loss_type')
    if loss_name == 'ipo' and loss_type != 'ipo':
        problems.append(f'loss.loss_type={loss_type!r} does not go with loss=ipo; for sigmoid or hinge use loss=dpo')
    elif loss_name == 'dpo' and loss_type not in ('sigmoid', 'hinge'):
        hint = 'use loss=ipo (its beta_range bounds the dynamic β)' if loss_type == 'ipo' else 'use sigmoid or hinge'
        problems.append(f'loss.loss_type={loss_type!r} is not a loss of loss=dpo; {hint}')
    if not isinstance(get('loss.average_log_prob'), bool):
        problems.append(f'loss.average_log_prob={get("loss.average_log_prob")!r} must be true or false')
    rpo_alpha = get('loss.rpo_alpha')
    if not (is_number(rpo_alpha) and rpo_alpha >= 0):
        problems.append(f'loss.rpo_alpha={rpo_alpha!r} (α_RPO, the weight of the chosen NLL) must be a number ≥ 0')
    momentum = get('loss.momentum')
    if not (is_number(momentum) and 0 <= momentum <= 1):
        problems.append(f'loss.momentum={momentum!r} (γ of the running margin statistics) must be in [0, 1]')
    m0 = get('loss.m0')
    if m0 is not None and not (is_number(m0) and math.isfinite(m0)):
        problems.append(f'loss.m0={m0!r} (M0) must be null (the running mean) or a number')
    for key, choices in (('beta_level', trainers.BETA_LEVELS), ('filter', trainers.FILTERS),
                         ('beta_dpo_scope', trainers.BETA_DPO_SCOPES)):
        if get(f'loss.{key}') not in choices:
            problems.append(f'loss.{key}={get(f"loss.{key}")!r} is unknown; choose one of {", ".join(choices)}')
    beta_range = get('loss.beta_range')
    low, high = beta_range if isinstance(beta_range, ListConfig) and len(beta_range) == 2 else (None, None)
    if not (is_number(low) and 0 <= low <= 1 and (high is None or (is_number(high) and high >= 1))):
        problems.append(f'loss.beta_range={beta_range!r} must be [r_lo, r_hi] with 0 ≤ r_lo ≤ 1 ≤ r_hi, or r_hi null '
                        f'(β stays in [r_lo·β0, r_hi·β0]), e.g. loss.beta_range=[0.5,2.0]')
    return problems


def check_model(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = [f'{key}={get(key)!r} is not a torch dtype (float32, bfloat16, float16)'
                for key in ('model.policy_dtype', 'model.reference_dtype') if not is_dtype(get(key))]
    if get('model.fsdp_policy_mp') is not None and not is_dtype(get('model.fsdp_policy_mp')):
        problems.append(f'model.fsdp_policy_mp={get("model.fsdp_policy_mp")!r} is not a torch dtype')
    if not isinstance(get('allow_tf32'), bool):
        problems.append(f'allow_tf32={get("allow_tf32")!r} must be true or false')
    if parallelism is not None and get('model.block_name') is None:
        needs = ('trainer=FSDPTrainer (it shards the model block by block)' if parallelism.trainer == 'FSDPTrainer' else
                 'activation_checkpointing=true with trainer=TensorParallelTrainer (it wraps each block)'
                 if parallelism.tensor_parallel and get('activation_checkpointing') else None)
        if needs:
            problems.append(f'model.block_name is null, but {needs} needs the class name of a transformer block; set '
                            f'e.g. model.block_name=GPTNeoXLayer (Pythia), LlamaDecoderLayer or GPT2Block')
    trust = get('trust_remote_code')
    if not isinstance(trust, bool):
        problems.append(f'trust_remote_code={trust!r} must be true or false')
    problems += model_directory_problems(get('model.name_or_path'), get('model.tokenizer_name_or_path'), trust is True)
    return problems


def check_lora(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    r = get('lora.r')
    if isinstance(r, bool) or not (isinstance(r, int) and r >= 0):
        return [f'lora.r={r!r} must be a non-negative integer: the adapters\' rank (e.g. lora.r=16), 0 for no LoRA']
    if r == 0:
        return []
    problems = []
    if not (is_number(get('lora.alpha')) and get('lora.alpha') > 0):
        problems.append(f'lora.alpha={get("lora.alpha")!r} (α; the adapters are scaled by α/r) must be a positive number')
    if not (is_number(get('lora.dropout')) and 0 <= get('lora.dropout') < 1):
        problems.append(f'lora.dropout={get("lora.dropout")!r} must be in [0, 1)')
    targets = get('lora.target_modules')
    if targets is not None and (isinstance(targets, str) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        problems.append(f'lora.target_modules={targets!r} must be null (the attention and MLP projections) or a '
                        f'non-empty list of module names, e.g. lora.target_modules=[q_proj,v_proj]')
    if parallelism is not None and parallelism.tensor_parallel:
        problems.append('lora.r > 0 does not work with trainer=TensorParallelTrainer (its plan splits the plain '
                        'model\'s layers, not LoRA\'s wrapped ones); use trainer=FSDPTrainer or BasicTrainer, or lora.r=0')
    return problems


def check_paths(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    problems = []
    archive = get('model.archive')
    if archive is not None and not Path(str(archive)).is_file():
        problems.append(f'model.archive={archive} does not exist; pass the policy.pt of an SFT run '
                        f'(RUN_DIR/LATEST/policy.pt)')
    train_pairs = get('synthetic.train_pairs')
    if train_pairs is not None and not Path(str(train_pairs)).expanduser().is_file():
        problems.append(f'synthetic.train_pairs={train_pairs} does not exist; write it with `python scripts/sample_pairs.py '
                        f'SFT_RUN_DIR --out {train_pairs}`, or set synthetic.train_pairs=null for the generated pairs')
    resume_from = get('resume_from')
    if resume_from is not None and not (Path(str(resume_from)) / 'LATEST' / 'policy.pt').is_file():
        problems.append(f'resume_from={resume_from} has no complete checkpoint (no LATEST/policy.pt); pass the run '
                        f'directory of an earlier run')
    return problems


def check_no_secrets(get: Callable, parallelism: Optional[Parallelism]) -> List[str]:
    """Secrets (WANDB_API_KEY, the judge endpoint's OPENAI_API_KEY, HF_TOKEN, ...) are read from the environment
    only: a config value that holds one (say, through ${oc.env:...}) would be written to config.yaml, the logs and
    wandb, so it is refused."""
    secrets = {name: value for name, value in os.environ.items()
               if any(word in name.upper() for word in SECRET_NAME_PARTS) and len(value) >= 8}
    problems = []
    for key in flat_items(OmegaConf.to_container(get(''), resolve=False)):
        value = str(get(key))
        problems += [f'{key} holds the value of the environment variable {name}, a secret, which would be written to '
                     f'config.yaml, the logs and wandb; secrets are read from the environment only, so remove it from '
                     f'the config' for name, secret in secrets.items() if secret in value]
    return problems


# An environment variable whose name contains one of these holds a secret (check_no_secrets).
SECRET_NAME_PARTS = ('API_KEY', 'TOKEN', 'SECRET', 'PASSWORD')


def first_existing_or_last(local_dirs: List[str]) -> Path:
    """The directory under which get_local_dir puts the run and the caches (not created here)."""
    return Path(next((d for d in local_dirs if os.path.exists(d)), local_dirs[-1]))


def writable(path: Path) -> bool:
    """Whether `path` is a writable directory, or could be created as one (its nearest existing ancestor is)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


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
    return build_models(config, parallelism, with_reference, empty=setup is not None and setup.rank != 0)


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
        raise ValueError('invalid config:\n  - ' + '\n  - '.join(problems))
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
        changed = resume_changes(config, Path(config.local_run_dir) / 'config.yaml')
        if changed:
            raise ValueError(f'resume_from={config.resume_from}: the run was started with different settings, so it '
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


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig) -> None:
    parallelism = prepare_run(config)
    rank0_print(OmegaConf.to_yaml(config))
    rank0_print('=' * 80)
    rank0_print(f'Writing to {socket.gethostname()}:{config.local_run_dir}')
    rank0_print('=' * 80)
    with removed_if_unused(config.local_run_dir, new_run=config.resume_from is None):
        if parallelism.sharded:
            launch(config, parallelism, functools.partial(sharded_worker, parallelism=parallelism))
        else:
            # No local name for the models: with precompute_ref_log_probs the trainer frees the reference.
            run_trainer(config, parallelism, *build_run_models(config, parallelism))


if __name__ == '__main__':
    main()
