"""Nodes without a shared disk: what lives on rank 0's disk only (model.archive, resume_from's checkpoint) is read there
and sent to the others (distributed.rank0_result), in 2 gloo processes that each pass their own directory.

Rank 1's directory does not exist, as on a second node without the first one's disk: before, rank 1 read
optimizer.pt, scheduler.pt and trainer_state.pt itself (FileNotFoundError there; on one machine, one copy of
optimizer.pt per process), and reference_cache_path stat'ed model.archive (FileNotFoundError).
"""
import json

import pytest
import torch
import torch.multiprocessing as mp

from distributed import get_open_port, init_distributed

pytestmark = pytest.mark.slow


def worker(rank, world_size, port, dirs, out):
    import torch.distributed as dist
    from checkpoints import load_training_state_on_rank0, save_checkpoint
    from distributed import rank0_result
    from utils import UserError
    init_distributed(rank, world_size, port)
    here = dirs[rank]
    record = {'identity': rank0_result(lambda: [p.name for p in sorted(here.iterdir())])}
    try:
        rank0_result(lambda: (_ for _ in ()).throw(UserError(f'model.archive={here}/missing.pt does not exist')))
    except UserError as e:
        record['error'] = str(e)
    if rank == 0:
        save_checkpoint(here / 'run', 16, {}, policy={'w': torch.ones(2)}, optimizer={'state': {0: {'m': torch.ones(3)}},
                        'param_groups': [{'lr': 0.1, 'params': [0]}]}, scheduler={'last_epoch': 2},
                        trainer_state={'example_counter': 16, 'margin_stats': {'mean': 0.5}})
    dist.barrier()
    saved = load_training_state_on_rank0(here / 'run' / 'LATEST')
    record.update(optimizer=sorted(saved.optimizer), scheduler=saved.scheduler,
                  example_counter=saved.trainer_state['example_counter'])
    (out / f'rank{rank}.json').write_text(json.dumps(record))
    dist.destroy_process_group()


def test_rank0_reads_reach_a_rank_without_the_files(tmp_path):
    """Rank 0's directory holds a.txt and b.txt; rank 1's does not exist. Both get rank 0's listing ['a.txt',
    'b.txt'] and rank 0's UserError (message naming rank 0's path); a checkpoint written on rank 0 only gives both
    ranks its scheduler state and counters, and rank 1 an empty optimizer state (filled later by
    load_gathered_optimizer_state from rank 0's)."""
    rank0_dir, rank1_dir = tmp_path / 'node0', tmp_path / 'node1_absent'
    rank0_dir.mkdir()
    (rank0_dir / 'a.txt').write_text('a')
    (rank0_dir / 'b.txt').write_text('b')
    mp.spawn(worker, args=(2, get_open_port(), [rank0_dir, rank1_dir], tmp_path), nprocs=2, join=True)
    records = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in (0, 1)]
    for record in records:
        assert record['identity'] == ['a.txt', 'b.txt']
        assert record['error'] == f'model.archive={rank0_dir}/missing.pt does not exist'
        assert record['scheduler'] == {'last_epoch': 2} and record['example_counter'] == 16
    assert records[0]['optimizer'] == ['param_groups', 'state'] and records[1]['optimizer'] == []
    assert not rank1_dir.exists()
