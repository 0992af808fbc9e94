"""What a GPU run decides before it starts, as pure functions tested on CPU (issue 24): the collective timeout, the
GPU of each process, the packages' versions."""
import datetime

import pytest

import models
from distributed import collective_timeout, local_device_index
from utils import UserError


def test_collective_timeout_is_an_hour_on_nccl_unless_set():
    """null: 3600 s for nccl (its own default, 600 s, is shorter than rank 0 loading or saving a 7B model), PyTorch's
    default (None, 30 minutes) for gloo; a set value wins on both."""
    assert collective_timeout(None, 'nccl') == datetime.timedelta(hours=1)
    assert collective_timeout(None, 'gloo') is None
    assert collective_timeout(90, 'nccl') == collective_timeout(90, 'gloo') == datetime.timedelta(seconds=90)


@pytest.mark.parametrize('local_rank, device_count, expected', [
    (0, 8, 0), (5, 8, 5),   # torchrun --nproc_per_node 8 on a node of 8 GPUs: cuda:LOCAL_RANK
    (5, 1, 0), (7, 1, 0),   # SLURM --gpus-per-task=1: each task sees one GPU, cuda:0 (cuda:5 is no device)
    (3, 2, 1)])             # 2 GPUs visible to each of 4 processes per node
def test_each_process_takes_its_local_rank_modulo_the_visible_gpus(local_rank, device_count, expected):
    assert local_device_index(local_rank, device_count) == expected


def test_versions_older_than_claimed_are_refused_naming_the_package(monkeypatch):
    """The installed torch and transformers pass; a minimum above what is installed gives a UserError naming the
    package, its installed version and the minimum."""
    from importlib.metadata import version
    assert models.version_problems() == []
    monkeypatch.setitem(models.MIN_VERSIONS, 'transformers', '99.0')
    with pytest.raises(UserError, match=rf'transformers {version("transformers")} is installed; this code needs '
                                        r'transformers ≥ 99.0'):
        models.check_versions()


def test_float16_without_loss_scaling_is_refused_naming_each_key(tmp_path):
    """policy_autocast=float16 and model.fsdp_policy_mp=float16 (and float16 master weights) give one problem each,
    naming the key; bfloat16 and the defaults none."""
    from distributed import precision_problems
    from helpers import compose_config
    assert precision_problems(compose_config([], tmp_path)) == []
    assert precision_problems(compose_config(['policy_autocast=bfloat16', 'model.fsdp_policy_mp=bfloat16'],
                                             tmp_path)) == []
    problems = precision_problems(compose_config(['policy_autocast=float16', 'model.fsdp_policy_mp=float16',
                                                  'model.policy_dtype=float16'], tmp_path))
    assert [p.split('=')[0] for p in problems] == ['policy_autocast', 'model.fsdp_policy_mp', 'model.policy_dtype']
    assert all('without loss scaling' in p and 'bfloat16' in p for p in problems)


def test_bfloat16_master_weights_warn_when_lr_is_below_half_a_step(tmp_path):
    """bfloat16's spacing at 0.01 is 2^(⌊log2 0.01⌋ − 7) = 2^-14 = 6.1e-5, so Adam-sized updates below 3.05e-5 round away
    on weights of 0.01: the original's lr 5e-7 with bfloat16 master weights warns, lr 1e-4 or float32 weights don't,
    nor SGD (its update scales with the gradient)."""
    from distributed import bfloat16_step, precision_warnings
    from helpers import compose_config
    assert bfloat16_step(0.01) == 2 ** -14
    assert bfloat16_step(1.0) == 2 ** -7  # bfloat16 has 8 significant bits: 1 + 2^-7 is the next number after 1
    bf16 = ['model.policy_dtype=bfloat16', 'optimizer=AdamW']
    (warning,) = precision_warnings(compose_config([*bf16, 'lr=5e-7'], tmp_path))
    assert warning.startswith('model.policy_dtype=bfloat16 with optimizer=AdamW and lr=5e-07') and '3.05e-05' in warning
    assert precision_warnings(compose_config([*bf16, 'lr=1e-4'], tmp_path)) == []
    assert precision_warnings(compose_config(['optimizer=AdamW', 'lr=5e-7'], tmp_path)) == []
    assert precision_warnings(compose_config(['model.policy_dtype=bfloat16', 'optimizer=SGD', 'lr=5e-7'], tmp_path)) == []


def test_tensor_parallelism_across_nodes_is_refused():
    """torchrun --nnodes 2 --nproc_per_node 8 (WORLD_SIZE 16, LOCAL_WORLD_SIZE 8) with TensorParallelTrainer: a
    UserError naming the 2 nodes and the way out; one node of 8 passes."""
    from distributed import refuse_tensor_parallel_across_nodes
    refuse_tensor_parallel_across_nodes(8, 8)
    with pytest.raises(UserError, match=r'all 16 processes, which span 2 nodes \(8 per node\).*torchrun --nnodes 1.*'
                                        r'trainer=FSDPTrainer across nodes'):
        refuse_tensor_parallel_across_nodes(16, 8)


def test_decide_parallelism_refuses_tensor_parallelism_under_a_two_node_torchrun(tmp_path, monkeypatch):
    """The environment torchrun gives a process of the second node refuses TensorParallelTrainer, not FSDPTrainer."""
    from distributed import decide_parallelism
    from helpers import compose_config
    for key, value in dict(RANK='9', WORLD_SIZE='16', LOCAL_RANK='1', LOCAL_WORLD_SIZE='8').items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match='span 2 nodes'):
        decide_parallelism(compose_config(['trainer=TensorParallelTrainer'], tmp_path))
    assert decide_parallelism(compose_config(['trainer=FSDPTrainer'], tmp_path)).n_processes == 16
