"""FSDPTrainer with gradient accumulation reduce-scatters the gradients once per step (after the last microbatch) with
fsdp_gradient_sync=step, after every microbatch with fsdp_gradient_sync=microbatch, and either way trains exactly as
before: the same losses and gradient norms as BasicTrainer with the same accumulation."""
import json

import pytest
import torch.multiprocessing as mp

from distributed import get_open_port, init_distributed
from helpers import FAST, compose_config
from train import build_run_models, prepare_run, run_trainer

pytestmark = pytest.mark.slow

# 4 SGD steps of 8 DPO pairs from the embedded model, each step two microbatches of 4 (2 per rank)
ACCUMULATED = [*FAST, 'optimizer=SGD', 'lr=0.01', 'max_grad_norm=10', 'n_examples=32', 'eval_every=32',
               'minimum_log_interval_secs=0', 'loss=dpo', 'loss.beta=0.1', 'gradient_accumulation_steps=2']


class RecordingSync:
    """Records, when the step's last microbatch starts its backward pass, whether any sharded (DTensor) parameter has
    a gradient yet: with the reduce-scatter skipped for the first microbatch, none has (FSDP2 keeps the blocks'
    gradients unsharded until then; the root's parameters, unsharded from the forward to the end of the step, hold
    plain full-size gradients meanwhile)."""

    def no_sync_unless(self, last):
        from torch.distributed.tensor import DTensor
        if last:
            self.sharded_grads_before_last.append(any(p.grad is not None for p in self.policy.parameters()
                                                      if isinstance(p, DTensor)))
        return super().no_sync_unless(last)


def worker(rank, world_size, port, tmp):
    import torch.distributed as dist
    import trainers
    setup = init_distributed(rank, world_size, port)
    for sync in ('step', 'microbatch'):
        config = compose_config([*ACCUMULATED, 'trainer=FSDPTrainer', f'fsdp_gradient_sync={sync}',
                                 f'local_run_dir={tmp / sync}'], tmp)
        parallelism = prepare_run(config)
        policy, reference = build_run_models(config, parallelism, setup)
        trainer = type('RecordingFSDPTrainer', (RecordingSync, trainers.FSDPTrainer), {})(
            policy, config, config.seed, config.local_run_dir, reference_model=reference, rank=setup.rank,
            world_size=setup.world_size, device=setup.device)
        trainer.sharded_grads_before_last = []
        trainer.train()
        (tmp / f'{sync}_rank{rank}.json').write_text(json.dumps(trainer.sharded_grads_before_last))
    dist.destroy_process_group()


def train_metrics(run_dir):
    return [m for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines()) if m['split'] == 'train']


def test_fsdp_accumulation_syncs_once_per_step_and_equals_basic_trainer(tmp_path):
    """2 ranks, 4 steps of 2 microbatches. fsdp_gradient_sync=step: at every step's last microbatch no sharded gradient
    exists yet on either rank (4 × False); fsdp_gradient_sync=microbatch: the first microbatch's gradients were
    reduce-scattered already (4 × True). Either way the per-step losses (first ln 2 = 0.693147) and gradient norms
    equal BasicTrainer's within 1e-4 relative."""
    config = compose_config([*ACCUMULATED, f'local_run_dir={tmp_path / "basic"}'], tmp_path)
    parallelism = prepare_run(config)
    run_trainer(config, parallelism, *build_run_models(config, parallelism))
    mp.spawn(worker, args=(2, get_open_port(), tmp_path), nprocs=2, join=True)
    basic = train_metrics(tmp_path / 'basic')
    assert len(basic) == 4
    assert basic[0]['loss/train'] == pytest.approx(0.693147, abs=1e-5)
    assert basic[3]['loss/train'] != pytest.approx(basic[0]['loss/train'], abs=1e-5)
    for sync, sharded_before_last in (('step', False), ('microbatch', True)):
        for rank in (0, 1):
            assert json.loads((tmp_path / f'{sync}_rank{rank}.json').read_text()) == [sharded_before_last] * 4
        fsdp = train_metrics(tmp_path / sync)
        assert [m['loss/train'] for m in fsdp] == pytest.approx([m['loss/train'] for m in basic], rel=1e-4)
        assert [m['grad_norm'] for m in fsdp] == pytest.approx([m['grad_norm'] for m in basic], rel=1e-4)
