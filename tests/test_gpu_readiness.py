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
