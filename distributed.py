"""Decisions about processes and devices, made once; launching; splitting a model over processes.

    from distributed import decide_parallelism
    parallelism = decide_parallelism(config)   # trainer, processes, data-parallel size, launcher, device map
    launch(config, parallelism, worker)        # worker(config, setup) in this process or in each spawned one

BasicTrainer runs in one process (several GPUs: the model split layer-wise with device_map='balanced').
FSDPTrainer and TensorParallelTrainer run one process per GPU (per n_cpu_processes on CPU, gloo), started
here with torch.multiprocessing.spawn, or by torchrun, whose environment gives the ranks. `fsdp_split` and
`tensor_parallel_split` place a model; `split_and_load` then broadcasts rank 0's weights into every
rank's part, so one machine never holds a full copy per process.
"""
import contextlib
import datetime
import math
import os
import signal
import socket
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from checkpoints import how_to_continue, optimizer_state_by_index, optimizer_state_by_name, with_own_implementation
from utils import get_block_modules, rank0_print


TRAINERS = ('BasicTrainer', 'FSDPTrainer', 'TensorParallelTrainer')
T = TypeVar('T')


@dataclass(frozen=True)
class Parallelism:
    """How a run uses processes and devices; `decide_parallelism` is the only reader of config.trainer."""
    trainer: str                 # the trainer class of trainers.py
    n_processes: int             # processes of the run (1 for BasicTrainer)
    data_parallel_size: int      # processes that each compute a slice of every batch (FSDP); 1 otherwise
    launcher: str                # 'none' (this process only), 'spawn' (train.py starts them) or 'torchrun'
    device_map: Optional[str]    # 'balanced': BasicTrainer splits the model layer-wise over several GPUs

    @property
    def sharded(self) -> bool:
        """The model is split over processes (FSDPTrainer, TensorParallelTrainer)."""
        return self.launcher != 'none'

    @property
    def tensor_parallel(self) -> bool:
        return self.trainer == 'TensorParallelTrainer'

    @property
    def whole_model_on_gpu(self) -> bool:
        """BasicTrainer with one GPU: the models go to cuda whole after loading."""
        return not self.sharded and self.device_map is None and torch.cuda.is_available()


def decide_parallelism(config: DictConfig) -> Parallelism:
    """The run's Parallelism from config.trainer, the launcher's environment and the GPUs; ValueError
    naming the key for an unknown trainer or a BasicTrainer started as several processes."""
    trainer = config.trainer
    if trainer not in TRAINERS:
        raise ValueError(f'trainer={trainer!r} is unknown; choose one of {", ".join(TRAINERS)}')
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if trainer == 'BasicTrainer':
        if world_size > 1:
            raise ValueError(f'trainer=BasicTrainer runs in one process, but the launcher started {world_size}; use '
                             f'trainer=FSDPTrainer or trainer=TensorParallelTrainer, or start it with python train.py')
        return Parallelism(trainer, 1, 1, 'none', 'balanced' if torch.cuda.device_count() > 1 else None)
    if launched_by_torchrun():
        n_processes, launcher = world_size, 'torchrun'
        if trainer == 'TensorParallelTrainer':
            refuse_tensor_parallel_across_nodes(world_size, int(os.environ.get('LOCAL_WORLD_SIZE', world_size)))
    else:
        n_processes, launcher = torch.cuda.device_count() or int(config.n_cpu_processes), 'spawn'
    data_parallel = n_processes if trainer == 'FSDPTrainer' else 1
    return Parallelism(trainer, n_processes, data_parallel, launcher, None)


def refuse_tensor_parallel_across_nodes(world_size: int, local_world_size: int) -> None:
    """UserError when TensorParallelTrainer's processes span several nodes. Its one mesh spans every process and
    each layer's forward and backward all-reduce or all-gather activations over it (Megatron-LM's rule: tensor
    parallelism within a node's NVLink, data parallelism across nodes); across nodes that traffic crosses the
    network at every layer."""
    if world_size > local_world_size:
        from utils import UserError
        raise UserError(f'trainer=TensorParallelTrainer splits every layer over all {world_size} processes, which span '
                        f'{-(-world_size // local_world_size)} nodes ({local_world_size} per node): its per-layer '
                        f'communication would cross the network. Run it on one node (torchrun --nnodes 1), or use '
                        f'trainer=FSDPTrainer across nodes')


def launch(config: DictConfig, parallelism: Parallelism, worker: Callable[[DictConfig, 'DistributedSetup'], None]) -> None:
    """Run `worker(config, setup)` in every process of a sharded run: in this process under torchrun (which
    started the others), else in `n_processes` new processes on this machine. Each joins the process group
    first and leaves it after."""
    if parallelism.launcher == 'torchrun':
        _worker_in_group(None, None, None, config, worker)
        return
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException
    port = config.fsdp_port or get_open_port()
    rank0_print(f'starting {parallelism.n_processes} processes ({parallelism.trainer})')
    context = mp.spawn(_worker_in_group, args=(parallelism.n_processes, port, config, worker),
                       nprocs=parallelism.n_processes, join=False)
    try:
        # join() returns when all processes have finished, or stops the others as soon as one fails (SIGTERM,
        # then SIGKILL after 30 s) and raises for the first failure it saw
        while not context.join():
            pass
    except ProcessException as e:
        died = killed_process(context.processes, e)
        if died is None:
            raise
        rank, signal_name = died
        raise ProcessDiedError(
            f'rank {rank} (pid {context.processes[rank].pid}) was killed by {signal_name}; the other processes of '
            f'the run were stopped. {how_to_continue(config.local_run_dir)}') from None


class ProcessDiedError(RuntimeError):
    """A process of a distributed run died or stopped answering; the message names it where that is known."""


def killed_process(processes, error: Exception) -> Optional[Tuple[int, str]]:
    """(rank, signal name) of the process that a signal other than the launcher's own SIGTERM ended, if any.

    torch's join reports the first failure it saw, which may be a survivor's error about the lost connection
    rather than the process that was killed (by the kernel's OOM killer, a scheduler, a user).
    """
    if getattr(error, 'signal_name', None) not in (None, 'SIGTERM'):
        return error.error_index, error.signal_name
    for rank, process in enumerate(processes):
        code = process.exitcode
        if code is not None and code < 0 and code != -signal.SIGTERM:
            return rank, signal.Signals(-code).name
    return None


def _worker_in_group(rank: Optional[int], world_size: Optional[int], port: Optional[int], config: DictConfig,
                     worker) -> None:
    setup = init_distributed(rank, world_size, port, config.collective_timeout_secs)
    # which process is which rank: to inspect a stuck one (py-spy dump --pid), or to read a launcher's report
    print(f'rank {setup.rank} of {setup.world_size}: pid {os.getpid()} on {socket.gethostname()}', flush=True)
    try:
        worker(config, setup)
    except RuntimeError as e:
        if not lost_peer(e) or isinstance(e, ProcessDiedError):
            raise
        who = f'rank {1 - setup.rank}' if setup.world_size == 2 else 'another process'
        raise ProcessDiedError(
            f'rank {setup.rank}: {who} of this run died or stopped answering ({str(e).splitlines()[0][:300]}); '
            f"the launcher's report names the process that failed first. {how_to_continue(config.local_run_dir)}") \
            from None
    finally:
        dist.destroy_process_group()


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process is gone (its connections closed) or silent (timeout)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'Timed out'))



def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any process. Decisions that change what every rank does next (stop and
    save, skip a batch) must agree, or the ranks' collectives no longer match and the job hangs."""
    if not dist.is_initialized():
        return flag
    flag_tensor = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag_tensor, op=dist.ReduceOp.MAX)
    return bool(flag_tensor.item())


def get_open_port() -> int:
    """A free TCP port on this machine, for the distributed rendezvous."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(('', 0))
        return s.getsockname()[1]


class DistributedSetup(NamedTuple):
    """Where this process stands in a distributed run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment variables) started this process."""
    return 'LOCAL_RANK' in os.environ and 'WORLD_SIZE' in os.environ


# collective_timeout_secs: null on GPUs. NCCL's own default (10 minutes, torch.distributed's
# default_pg_nccl_timeout) is shorter than rank 0's longest pauses: loading a policy, a reference and an archive of
# 7-8B models while the others wait in the weights' broadcast, or writing a 20-100 GB checkpoint before a barrier.
NCCL_DEFAULT_TIMEOUT_SECS = 3600


def collective_timeout(timeout_secs: Optional[float], backend: str) -> Optional[datetime.timedelta]:
    """How long a collective waits for the other processes: `timeout_secs` if set; else an hour for nccl and None
    (PyTorch's default, 30 minutes) for gloo."""
    if timeout_secs is not None:
        return datetime.timedelta(seconds=timeout_secs)
    return datetime.timedelta(seconds=NCCL_DEFAULT_TIMEOUT_SECS) if backend == 'nccl' else None


def local_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with LOCAL_RANK `local_rank` among the `device_count` it sees: its local rank modulo the
    count. A launcher that gives each process its own GPU (SLURM's --gpus-per-task=1, CUDA_VISIBLE_DEVICES per task)
    leaves every process one visible GPU, cuda:0, whatever its local rank; cuda:LOCAL_RANK would be an invalid
    ordinal for every process but the first."""
    return local_rank % device_count


def init_distributed(rank: Optional[int] = None, world_size: Optional[int] = None,
                     port: Optional[int] = None, timeout_secs: Optional[float] = None) -> DistributedSetup:
    """Join the process group: the one place that decides rank, world size, device and backend.

    Under torchrun the ranks come from its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); otherwise train.py spawned `world_size` processes on this machine and passes `rank`
    and the rendezvous `port`. GPUs: nccl, one GPU per process (`local_device_index`). CPU: gloo, and the
    machine's cores are divided among its processes (two processes on two cores each with two
    threads run several times slower than with one). timeout_secs (collective_timeout_secs): how long a
    collective waits for the other processes before it fails (`collective_timeout`). Returns the existing
    setup if already joined.
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
        device = torch.device('cuda', local_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = 'nccl'
    else:
        device = torch.device('cpu')
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        torch.set_num_threads(max(1, cores // local_world_size))
        backend = 'gloo'
    if not dist.is_initialized():
        extra = {'device_id': device} if device.type == 'cuda' else {}
        timeout = collective_timeout(timeout_secs, backend)
        if timeout is not None:
            extra['timeout'] = timeout
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **extra)
    return DistributedSetup(dist.get_rank(), dist.get_world_size(), local_rank, device)


def holds_rank0_files() -> bool:
    """Whether this process is rank 0 of its run (or alone), before any process group exists (torchrun's RANK): the
    one that checks the files kept on rank 0's disk only (model.archive, resume_from's run directory), which nodes
    without a shared file system do not have (config_schema.path_problems)."""
    return int(os.environ.get('RANK', '0')) == 0


def rank0_result(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its value sent to every rank (pickled; keep it small); outside a process group, just
    `compute()`. Collective.

    For what reads rank 0's disk: nodes need not share a file system, and model.archive, resume_from's run
    directory (its checkpoints and config.yaml) and the reference cache live on rank 0's. An exception on rank 0
    is raised on every rank (as its own type where it pickles, else RuntimeError with its message), so no rank is
    left waiting in a collective the others never reach.
    """
    if not dist.is_initialized():
        return compute()
    box: List = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ('value', compute())
        except Exception as e:
            box[0] = ('error', e if _pickles(e) else RuntimeError(f'{type(e).__name__}: {e}'))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == 'error':
        if dist.get_rank() == 0:
            raise value
        raise value from None
    return value


def _pickles(value) -> bool:
    import pickle
    try:
        pickle.loads(pickle.dumps(value))
        return True
    except Exception:
        return False


# Optimizers whose update of a weight is about lr in size whatever the gradient's scale (Adam's m / √v; RMSprop's g / √v)
LR_SIZED_UPDATES = ('Adam', 'AdamW', 'RMSprop', 'Adamax', 'NAdam', 'RAdam', 'Adagrad')
# A weight magnitude most of a language model's weights exceed (GPT-style initialisation: standard deviation 0.02)
TYPICAL_WEIGHT = 0.01


def precision_problems(config: DictConfig) -> List[str]:
    """float16 settings that would train without loss scaling, each naming its key (the config checker refuses them).

    Nothing here scales the loss (no torch.amp.GradScaler): float16's smallest normal value, 6e-5, lets the
    gradients of a language model underflow to 0 (Micikevicius et al. 2018, "Mixed Precision Training", §3.2),
    silently. bfloat16 has float32's exponent range and needs no scaling.
    """
    problems = []
    for key in ('policy_autocast', 'model.fsdp_policy_mp', 'model.policy_dtype'):
        if OmegaConf.select(config, key) == 'float16':
            problems.append(f'{key}=float16 trains without loss scaling (no GradScaler here): the gradients underflow in '
                            f'float16. Use {key}=bfloat16 (same memory, float32\'s range) on GPUs that have it (A100, '
                            f'H100, L4 and newer), or float32')
    return problems


def bfloat16_step(magnitude: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) at `magnitude`: 2^(⌊log2 |x|⌋ − 7)."""
    return 2.0 ** (math.floor(math.log2(abs(magnitude))) - 7)


def precision_warnings(config: DictConfig) -> List[str]:
    """Settings that train, but barely: bfloat16 master weights (model.policy_dtype=bfloat16: the optimizer updates
    them in place) with an optimizer whose updates are about lr in size and an lr below half a bfloat16 step at
    TYPICAL_WEIGHT (3.05e-5 at 0.01), where most updates round away and the weights do not move."""
    lr = OmegaConf.select(config, 'lr')
    if (OmegaConf.select(config, 'model.policy_dtype') != 'bfloat16' or config.optimizer not in LR_SIZED_UPDATES
            or not isinstance(lr, (int, float)) or lr <= 0):
        return []
    half_step = bfloat16_step(TYPICAL_WEIGHT) / 2
    if lr >= half_step:
        return []
    return [f'model.policy_dtype=bfloat16 with optimizer={config.optimizer} and lr={lr:g}: each update is about lr, '
            f'below half a bfloat16 step ({half_step:.3g}) for weights of magnitude {TYPICAL_WEIGHT} and more, so most '
            f'updates round away. Keep float32 master weights (model.policy_dtype=float32) and compute in bfloat16 '
            f'(model.fsdp_policy_mp=bfloat16 with FSDPTrainer, policy_autocast=bfloat16 otherwise)']


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


def full_state_dict_options(ignore_frozen_params: bool = False):
    """Gather whole tensors to CPU on rank 0 (the other ranks get {}); ignore_frozen_params: the trained ones only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=ignore_frozen_params)


def gathered_model_state(model: nn.Module, trainable_only: bool = False) -> Dict[str, torch.Tensor]:
    """The whole state dict of a split model on rank 0 ({} elsewhere), or only its trained tensors. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=full_state_dict_options(ignore_frozen_params=trainable_only))


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: List[str]) -> Dict:
    """The whole optimizer state of a split model on rank 0 ({} elsewhere), keyed by the position of each
    parameter in `names` as a one-process optimizer keys it (checkpoints.optimizer_state_by_index). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=full_state_dict_options())
    return optimizer_state_by_index(state, names) if state else {}


def load_gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict,
                                  names: List[str]) -> None:
    """The inverse of gathered_optimizer_state: rank 0's whole `state` into every rank's shards ({} on the other ranks,
    which never read optimizer.pt: checkpoints.load_training_state_on_rank0). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    is_rank0 = dist.get_rank() == 0
    state = with_own_implementation(optimizer, state) if is_rank0 else {}
    stateless_groups = rank0_result(lambda: None if state['state'] else state['param_groups'])
    if stateless_groups is not None:
        # A stateless optimizer (SGD without momentum): only the hyperparameters, the same for every rank.
        # set_optimizer_state_dict fails on it (torch 2.13: AssertionError 'Expected device to be set').
        optimizer.load_state_dict(with_own_implementation(optimizer, {'state': {}, 'param_groups': stateless_groups}))
        return
    # broadcast_from_rank0: rank 0's tensors are sent shard by shard; the other ranks' (empty) input is not read
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(state, names) if is_rank0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def fsdp_split(model: nn.Module, config: DictConfig, reference: bool) -> nn.Module:
    """`model` sharded with FSDP2 (`fully_shard`) over the process group, in place: every transformer block
    (model.block_name) as one unit, then the root; a block's parameters are gathered just before it runs
    and freed after. model.fsdp_policy_mp is the policy's compute dtype (gradients reduced in float32);
    activation_checkpointing=true wraps the policy's blocks first. The frozen reference (`reference`) gets
    neither: it computes in its own model.reference_dtype, as the original wraps it without mixed precision,
    so its log-probabilities (the margins β, the filter and the loss read) are BasicTrainer's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = get_block_modules(model, config.model.block_name)
    if config.activation_checkpointing and not reference:
        blocks = checkpoint_blocks(model, blocks)
    mp_dtype = None if reference else config.model.fsdp_policy_mp
    mixed_precision = (MixedPrecisionPolicy(param_dtype=getattr(torch, mp_dtype), reduce_dtype=torch.float32)
                       if mp_dtype else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=mixed_precision)
    return fully_shard(model, mp_policy=mixed_precision)


def tensor_parallel_split(model: nn.Module, config: DictConfig, world_size: int, device: torch.device,
                          reference: bool) -> nn.Module:
    """`model` split with tensor parallelism over `world_size` processes, in place.

    The split follows the model's own plan (`base_model_tp_plan` of its transformers config: column-
    wise q/k/v and up projections, row-wise output and down projections), so GPT-NeoX and Llama
    families work as they are. Attention heads (and key/value heads) must divide by the number of
    processes. Embeddings and norms are replicated.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh(device.type, (world_size,))
    # src_data_rank=None: each rank keeps its own slice without communication (the weights on
    # ranks other than 0 are still empty; split_and_load fills them from rank 0 afterwards).
    parallelize_module(model, mesh, tensor_parallel_plan(model, world_size), src_data_rank=None)
    if not next(model.parameters()).is_meta:
        model.to(device)  # the split matrices are on the GPU now; the rest is where it was built
    if config.activation_checkpointing and not reference:
        # After the split: the plan names modules by their paths, which the wrappers change.
        checkpoint_blocks(model, get_block_modules(model, config.model.block_name))
    return model
