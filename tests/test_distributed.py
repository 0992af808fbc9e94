"""FSDPTrainer and TensorParallelTrainer in 2 CPU processes (gloo) against BasicTrainer in one.

The same data, seed and SGD steps give the same per-step losses (relative difference ≤ 1e-4 in
float32; float32 sums in a different order differ by ~1e-7) and the same saved weights, for SFT, DPO
and β-DPO; β-DPO's β and keep mask are identical on both ranks at every step; an SFT checkpoint of
either kind starts a β-DPO run of the other; an RMSprop run resumed from an FSDP checkpoint continues
as the uninterrupted BasicTrainer run does; precomputed reference log-probabilities give the losses of
the split reference model in memory; the FSDP reference computes in its own dtype whatever the policy's mixed
precision. Runs: BasicTrainer in this process, one FSDP run through
`python train.py trainer=FSDPTrainer n_cpu_processes=2`, one TensorParallelTrainer run through
torchrun, and the rest in one 2-process group started here (one start-up for all of them).
"""
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import FAST, ROOT, compose_config, run_dir_from_output, run_train, save_tiny_llama
from distributed import get_open_port, init_distributed
from reference_cache import load_reference_cache, reference_cache_path
from train import build_run_models, prepare_run, run_trainer
from losses import BetaDPO

pytestmark = pytest.mark.slow

# 4 SGD steps of 8 examples; SFT's gradient norms (about 45) are clipped to 10, so clipping over
# shards is part of the comparison.
COMMON = [*FAST, 'optimizer=SGD', 'lr=0.01', 'max_grad_norm=10', 'n_examples=32', 'eval_every=16',
          'minimum_log_interval_secs=0', 'n_cpu_processes=2']
DPO = ['loss=dpo', 'loss.beta=0.1']
BETA_DPO = [*DPO, 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6']
# RMSprop has a state to save and restore; 2 steps, then a resume for a third
RMSPROP = [*FAST, 'optimizer=RMSprop', 'lr=1e-3', 'eval_every=16', 'minimum_log_interval_secs=0', 'loss=sft']


def read_metrics(run_dir, split='train'):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()
            if json.loads(line)['split'] == split]


def train_losses(run_dir):
    return [m['loss/train'] for m in read_metrics(run_dir)]


def weights(run_dir):
    return torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)['state']


def train_basic(tmp, name, overrides):
    """A BasicTrainer run in this process; returns its run directory."""
    config = compose_config([*overrides, f'exp_name={name}'], tmp)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    run_trainer(config, parallelism, policy, reference)
    return config.local_run_dir


class RecordingBetaDPO(BetaDPO):
    """Records every training microbatch's β and whole keep mask as this rank computed them, after
    first drawing a rank-dependent number of values from the global random stream, which puts the
    ranks' global random states out of step (as sampling does)."""

    def batch_beta_and_mask(self, margins, train):
        torch.rand(self.rank + 1)
        beta, keep = super().batch_beta_and_mask(margins, train)
        if train:
            self.records.append({'beta': beta.item(), 'keep': keep.int().tolist()})
        return beta, keep


class RecordingFilter:
    """A trainer whose β-DPO records its decisions (RecordingBetaDPO) into RUN_DIR/filter_rank{rank}.json."""

    def train(self):
        self.beta_dpo = RecordingBetaDPO(self.config.loss, self.seed, self.device)  # nothing drawn yet: the same
        self.beta_dpo.rank, self.beta_dpo.records = self.rank, []
        super().train()
        (self.run_dir / f'filter_rank{self.rank}.json').write_text(json.dumps(self.beta_dpo.records))


class RecordingPrecompute:
    """Records what this rank's reference pass found and computed, and whether the split reference
    model is gone afterwards. A DPO run first deletes the cache, so it computes every pair; a β-DPO run
    then reads the DPO run's file."""

    def precompute_reference_logps(self):
        path = self.reference_cache_file()
        if self.config.loss.mode_loss == 'mean' and self.is_main:
            path.unlink(missing_ok=True)
        torch.distributed.barrier()
        n_before = len(load_reference_cache(path))
        reference = weakref.ref(self.reference.model)
        super().precompute_reference_logps()
        gc.collect()
        record = {'n_before': n_before, 'n_after': len(self.reference.cache), 'n_on_disk': len(load_reference_cache(path)),
                  'reference_freed': reference() is None}
        (self.run_dir / f'precompute_rank{self.rank}.json').write_text(json.dumps(record))
        (self.run_dir / 'cache_path.txt').write_text(str(path))


def sharded_worker(rank, world_size, port, jobs):
    """One of the 2 processes: each job (overrides, tmp) is prepared and trained as train.py would
    (run directory shared from rank 0), β-DPO runs with RecordingFilter, precompute_ref_log_probs runs
    with RecordingPrecompute."""
    import trainers
    setup = init_distributed(rank, world_size, port)
    for overrides, tmp in jobs:
        config = compose_config(overrides, tmp)
        parallelism = prepare_run(config)
        trainer_class = getattr(trainers, parallelism.trainer)
        if config.loss.name != 'sft' and config.loss.mode_loss == 'beta_DPO':
            trainer_class = type(f'Recording{trainer_class.__name__}', (RecordingFilter, trainer_class), {})
        if config.precompute_ref_log_probs:
            trainer_class = type(f'Precompute{trainer_class.__name__}', (RecordingPrecompute, trainer_class), {})
        policy, reference = build_run_models(config, parallelism, setup)
        trainer = trainer_class(policy, config, config.seed, config.local_run_dir, reference_model=reference,
                                rank=setup.rank, world_size=setup.world_size, device=setup.device)
        del policy, reference  # the trainer holds the only references, as in train.py
        trainer.train()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Run directories by name. BasicTrainer: sft, dpo and beta_dpo (both from sft's archive),
    rmsprop_24. FSDP: fsdp_sft (train.py), fsdp_dpo, fsdp_beta_dpo, fsdp_rmsprop_16 and its resume to 24
    examples. TP: tp_sft (torchrun), tp_dpo, tp_beta_dpo. And basic_beta_dpo_from_fsdp. Each sharded
    DPO / β-DPO run also as {name}_precomputed, with precompute_ref_log_probs=true, and BasicTrainer's
    dpo_precomputed and FSDP's fsdp_dpo_bf16_precomputed (model.fsdp_policy_mp=bfloat16)."""
    tmp = tmp_path_factory.mktemp('distributed')
    found = {}
    found['sft'] = Path(train_basic(tmp, 'sft', [*COMMON, 'loss=sft']))
    archive = f'model.archive={found["sft"]}/LATEST/policy.pt'
    found['dpo'] = Path(train_basic(tmp, 'dpo', [*COMMON, *DPO, archive]))
    found['beta_dpo'] = Path(train_basic(tmp, 'beta_dpo', [*COMMON, *BETA_DPO, archive]))
    found['dpo_precomputed'] = Path(train_basic(tmp, 'dpo_precomputed', [*COMMON, *DPO, archive,
                                                                          'precompute_ref_log_probs=true']))
    found['rmsprop_24'] = Path(train_basic(tmp, 'rmsprop', [*RMSPROP, 'n_examples=24']))
    llama = [f'model.name_or_path={save_tiny_llama(tmp / "llama")}', 'model.tokenizer_name_or_path=embedded:tiny',
             'model.block_name=LlamaDecoderLayer', 'loss=sft', 'n_examples=16']
    found['llama_sft'] = Path(train_basic(tmp, 'llama_sft', [*COMMON, *llama]))

    result = run_train([*COMMON, f'local_dirs=[{tmp}]', 'loss=sft', 'trainer=FSDPTrainer', 'exp_name=fsdp_sft'],
                       cwd=tmp)
    found['fsdp_sft'] = run_dir_from_output(result.stdout)
    found['basic_beta_dpo_from_fsdp'] = Path(train_basic(
        tmp, 'basic_beta_dpo_from_fsdp', [*COMMON, *BETA_DPO, f'model.archive={found["fsdp_sft"]}/LATEST/policy.pt']))

    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--rdzv_backend', 'c10d',
                '--rdzv_endpoint', f'127.0.0.1:{get_open_port()}', str(ROOT / 'train.py'), *COMMON,
                f'local_dirs=[{tmp}]', 'loss=sft', 'trainer=TensorParallelTrainer', 'exp_name=tp_sft']
    result = subprocess.run(torchrun, cwd=tmp, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    found['tp_sft'] = run_dir_from_output(result.stdout)
    found['tp_sft_stdout'] = result.stdout

    # Each run in a directory named exactly after it: under the default timestamped names (NAME_DATE_TIME) a
    # lookup by prefix is ambiguous (fsdp_dpo_* also matches fsdp_dpo_checkpointed_*, fsdp_dpo_precomputed_* and
    # fsdp_dpo_bf16_precomputed_*), and which one a glob returned first depended on the file system's order of
    # the timestamps: about 1 full run in 4 compared the bfloat16 run's losses (first 0.693203, not ln 2) as
    # fsdp_dpo's and failed, and others silently compared a precomputed run with itself.
    sharded_runs = [  # (name, trainer, overrides)
        ('fsdp_dpo', 'FSDPTrainer', [*DPO, archive]),
        ('fsdp_beta_dpo', 'FSDPTrainer', [*BETA_DPO, archive]),
        ('tp_dpo', 'TensorParallelTrainer', [*DPO, archive]),
        ('tp_beta_dpo', 'TensorParallelTrainer', [*BETA_DPO, archive]),
        ('fsdp_dpo_checkpointed', 'FSDPTrainer', [*DPO, archive, 'activation_checkpointing=true']),
        ('fsdp_sft_bf16', 'FSDPTrainer', ['loss=sft', 'model.fsdp_policy_mp=bfloat16']),
        ('fsdp_llama_sft', 'FSDPTrainer', llama),
        ('tp_llama_sft', 'TensorParallelTrainer', [*llama, 'activation_checkpointing=true']),
        ('fsdp_dpo_precomputed', 'FSDPTrainer', [*DPO, archive, 'precompute_ref_log_probs=true']),
        ('fsdp_beta_dpo_precomputed', 'FSDPTrainer', [*BETA_DPO, archive, 'precompute_ref_log_probs=true']),
        ('tp_dpo_precomputed', 'TensorParallelTrainer', [*DPO, archive, 'precompute_ref_log_probs=true']),
        ('tp_beta_dpo_precomputed', 'TensorParallelTrainer', [*BETA_DPO, archive, 'precompute_ref_log_probs=true']),
        # after fsdp_beta_dpo_precomputed, which reads the file of fsdp_dpo_precomputed that this one replaces
        ('fsdp_dpo_bf16_precomputed', 'FSDPTrainer', [*DPO, archive, 'model.fsdp_policy_mp=bfloat16',
                                                      'precompute_ref_log_probs=true'])]
    jobs = [([*COMMON, *extra, f'trainer={trainer}', f'exp_name={name}', f'local_run_dir={tmp / "sharded" / name}'],
             tmp) for name, trainer, extra in sharded_runs]
    fsdp_rmsprop = tmp / 'fsdp_rmsprop_run'
    jobs += [([*RMSPROP, 'trainer=FSDPTrainer', 'n_examples=16', f'local_run_dir={fsdp_rmsprop}'], tmp),
             ([*RMSPROP, 'trainer=FSDPTrainer', 'n_examples=24', f'resume_from={fsdp_rmsprop}'], tmp)]
    # plain SGD keeps no optimizer state at all: its resume takes another path (ShardedTrainer.load_optimizer_state_dict)
    fsdp_sgd = tmp / 'fsdp_sgd_run'
    jobs += [([*COMMON, 'loss=sft', 'trainer=FSDPTrainer', 'n_examples=16', f'local_run_dir={fsdp_sgd}'], tmp),
             ([*COMMON, 'loss=sft', 'trainer=FSDPTrainer', f'resume_from={fsdp_sgd}'], tmp)]
    mp.spawn(sharded_worker, args=(2, get_open_port(), jobs), nprocs=2, join=True)
    for name, _, _ in sharded_runs:
        found[name] = tmp / 'sharded' / name
    found['fsdp_rmsprop_24'] = fsdp_rmsprop
    found['fsdp_sgd_resumed'] = fsdp_sgd
    return found


@pytest.mark.parametrize('loss', ['sft', 'dpo', 'beta_dpo'])
@pytest.mark.parametrize('trainer', ['fsdp', 'tp'])
def test_sharded_trainers_match_basic_trainer(runs, trainer, loss):
    """Per-step training losses and the final weights equal BasicTrainer's. SFT's first loss is the
    summed NLL of 4 responses (about 48 nats for the random tiny model); DPO's first is ln 2 = 0.693147
    only if policy = reference, which holds because both were loaded from the same archive."""
    basic, sharded = runs[loss], runs[f'{trainer}_{loss}']
    basic_losses, sharded_losses = train_losses(basic), train_losses(sharded)
    assert len(basic_losses) == 4
    assert sharded_losses == pytest.approx(basic_losses, rel=1e-4)
    if loss != 'sft':
        assert basic_losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert [m['grad_norm'] for m in read_metrics(sharded)] == pytest.approx(
        [m['grad_norm'] for m in read_metrics(basic)], rel=1e-4)
    basic_weights, sharded_weights = weights(basic), weights(sharded)
    assert sharded_weights.keys() == basic_weights.keys()
    for key, value in basic_weights.items():
        torch.testing.assert_close(sharded_weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
    if loss != 'sft':  # the preference runs moved away from the archive they started from
        archive = weights(runs['sft'])
        assert max((value - archive[key]).abs().max().item() for key, value in basic_weights.items()) > 1e-5


def test_sft_clipping_was_active(runs):
    """SFT's gradient norms exceed max_grad_norm = 10, so the shards were clipped together."""
    assert min(m['grad_norm'] for m in read_metrics(runs['sft'])) > 10


@pytest.mark.parametrize('trainer', ['fsdp', 'tp'])
def test_beta_dpo_mask_and_beta_identical_on_both_ranks(runs, trainer):
    """4 steps of one microbatch of 8 pairs: k = ⌊8 · 0.8⌋ = 6 kept at each, the same 6 on both ranks
    with the same β, though the ranks' global random streams were put out of step; β leaves β0 = 0.1."""
    run_dir = runs[f'{trainer}_beta_dpo']
    rank0 = json.loads((run_dir / 'filter_rank0.json').read_text())
    rank1 = json.loads((run_dir / 'filter_rank1.json').read_text())
    assert len(rank0) == 4
    assert rank0 == rank1
    assert all(sum(record['keep']) == 6 for record in rank0)
    assert len({tuple(record['keep']) for record in rank0}) > 1
    assert max(abs(record['beta'] - 0.1) for record in rank0) > 1e-5
    assert [m['record_train/beta_used'] for m in read_metrics(run_dir)] == pytest.approx(
        [r['beta'] for r in rank0], rel=1e-6)
    saved = json.loads((run_dir / 'LATEST' / 'beta_dpo_stats.json').read_text())
    basic = json.loads((runs['beta_dpo'] / 'LATEST' / 'beta_dpo_stats.json').read_text())
    assert saved == pytest.approx(basic, rel=1e-4, abs=1e-6)  # μ is about 2e-4 nats


def test_fsdp_sft_archive_starts_a_basic_beta_dpo_run(runs):
    """FSDP's SFT checkpoint equals BasicTrainer's, so the β-DPO run it starts is the same run: first
    loss ln 2 = 0.693147 and the same losses as β-DPO from BasicTrainer's SFT."""
    losses = train_losses(runs['basic_beta_dpo_from_fsdp'])
    assert losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses == pytest.approx(train_losses(runs['beta_dpo']), rel=1e-4)
    archive = torch.load(runs['fsdp_sft'] / 'LATEST' / 'policy.pt', weights_only=True)
    assert set(archive) == {'step_idx', 'state', 'metrics'} and archive['step_idx'] == 32


def test_a_stateless_optimizer_resumes_under_fsdp(runs):
    """SGD without momentum has no optimizer state; an FSDP run resumed from its step-16 checkpoint (which torch 2.13's
    set_optimizer_state_dict fails on: 'Expected device to be set') continues as the uninterrupted BasicTrainer run."""
    assert train_losses(runs['fsdp_sgd_resumed']) == pytest.approx(train_losses(runs['sft']), rel=1e-4)
    assert len(train_losses(runs['sft'])) == 4


def test_fsdp_resume_continues_like_an_uninterrupted_run(runs):
    """RMSprop for 2 steps with FSDP, then resumed for a third, logs the losses of 3 uninterrupted
    BasicTrainer steps; its optimizer.pt has BasicTrainer's layout (parameter positions 0..51 of the
    tiny GPT-NeoX's 52 tensors) and the same squared-gradient averages."""
    assert train_losses(runs['fsdp_rmsprop_24']) == pytest.approx(train_losses(runs['rmsprop_24']), rel=1e-4)
    assert len(train_losses(runs['rmsprop_24'])) == 3
    fsdp = torch.load(runs['fsdp_rmsprop_24'] / 'LATEST' / 'optimizer.pt', weights_only=True)['state']
    basic = torch.load(runs['rmsprop_24'] / 'LATEST' / 'optimizer.pt', weights_only=True)['state']
    assert sorted(fsdp['state']) == sorted(basic['state']) == list(range(52))
    assert fsdp['param_groups'][0]['params'] == list(range(52))
    for index, state in basic['state'].items():
        torch.testing.assert_close(fsdp['state'][index]['square_avg'], state['square_avg'], rtol=1e-3, atol=1e-9)


def test_torchrun_run_logs_once_into_one_run_directory(runs):
    """Under torchrun both processes run train.py's main: one run directory (rank 0's), one config
    print, one metrics line per step."""
    stdout = runs['tp_sft_stdout']
    assert stdout.count('Writing to ') == 1
    assert len(list(runs['tp_sft'].parent.glob('tp_sft_*'))) == 1
    assert [m['counters/examples'] for m in read_metrics(runs['tp_sft'])] == [8, 16, 24, 32]


@pytest.mark.parametrize('name, basic', [('fsdp_dpo_checkpointed', 'dpo'), ('fsdp_llama_sft', 'llama_sft'),
                                         ('tp_llama_sft', 'llama_sft')])
def test_checkpointed_and_llama_runs_match_basic_trainer(runs, name, basic):
    """Activation checkpointing recomputes the same numbers; a Llama with grouped key/value heads
    (4 query, 2 key/value: one of each per rank under TP) and tied embeddings gives BasicTrainer's
    losses and weights, its embedding and output matrices still one tensor."""
    assert train_losses(runs[name]) == pytest.approx(train_losses(runs[basic]), rel=1e-4)
    basic_weights, sharded_weights = weights(runs[basic]), weights(runs[name])
    for key, value in basic_weights.items():
        torch.testing.assert_close(sharded_weights[key], value, rtol=1e-4, atol=1e-6, msg=key)
    if 'llama' in name:  # one tensor trained for both uses, on every rank (untied, they would drift apart)
        torch.testing.assert_close(sharded_weights['lm_head.weight'], sharded_weights['model.embed_tokens.weight'],
                                   rtol=0, atol=0)


def test_fsdp_bfloat16_compute_stays_close_to_float32(runs):
    """model.fsdp_policy_mp=bfloat16: bfloat16 compute (8 bits of mantissa, relative error about
    0.4% per rounding) gives SFT losses within 2% of float32's; the saved weights stay float32."""
    assert train_losses(runs['fsdp_sft_bf16']) == pytest.approx(train_losses(runs['sft']), rel=0.02)
    assert train_losses(runs['fsdp_sft_bf16']) != pytest.approx(train_losses(runs['sft']), rel=1e-5)
    assert all(value.dtype == torch.float32 for value in weights(runs['fsdp_sft_bf16']).values())


@pytest.mark.parametrize('loss', ['dpo', 'beta_dpo'])
@pytest.mark.parametrize('trainer', ['fsdp', 'tp'])
def test_precomputed_reference_gives_the_in_memory_losses(runs, trainer, loss):
    """precompute_ref_log_probs=true on 2 processes: the same per-step losses as the run with the split
    reference model in memory (first ln 2 = 0.693147: policy = reference). The cache holds 40 pairs (4
    training batches of 8 and one evaluation batch of 8): the DPO run computed all 40 from an empty cache
    (FSDP: 4 per rank and batch, gathered; TP: every rank all 8), the β-DPO run read them from the file
    rank 0 wrote; afterwards the split reference model is gone on both ranks."""
    precomputed, in_memory = runs[f'{trainer}_{loss}_precomputed'], runs[f'{trainer}_{loss}']
    losses = train_losses(precomputed)
    assert len(losses) == 4 and losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses == pytest.approx(train_losses(in_memory), rel=1e-4)
    n_before = 0 if loss == 'dpo' else 40
    for rank in (0, 1):
        record = json.loads((precomputed / f'precompute_rank{rank}.json').read_text())
        assert record == {'n_before': n_before, 'n_after': 40, 'n_on_disk': 40, 'reference_freed': True}
    if loss == 'beta_dpo':  # the same β at every step as with the reference model in memory
        assert [m['record_train/beta_used'] for m in read_metrics(precomputed)] == pytest.approx(
            [m['record_train/beta_used'] for m in read_metrics(in_memory)], rel=1e-4)


def test_fsdp_reference_computes_in_its_own_dtype_not_the_policy_mixed_precision(runs):
    """model.fsdp_policy_mp=bfloat16 under FSDP (2 processes): the reference, wrapped without mixed precision,
    gives BasicTrainer's float32 log-probabilities for all 40 pairs (within 1e-5 relative; summed log-probs of
    −73 to −22 nats). Wrapped in the policy's bfloat16, as before the fix, they were off by up to 0.019 nats
    (mean 0.0068, 5e-4 relative; measured with the bug restored), as much as the margins themselves at the
    first steps. Its cache file is not BasicTrainer's (trainer and processes are part of the key) but is the
    float32 FSDP run's (model.fsdp_policy_mp is not: it never touches the reference)."""
    from omegaconf import OmegaConf
    from models import load_tokenizer
    basic_config = OmegaConf.load(runs['dpo_precomputed'] / 'config.yaml')
    basic = load_reference_cache(reference_cache_path(basic_config, load_tokenizer(basic_config), 1, 'cpu'))
    fsdp_path = (runs['fsdp_dpo_bf16_precomputed'] / 'cache_path.txt').read_text()
    fsdp = load_reference_cache(Path(fsdp_path))
    assert len(basic) == len(fsdp) == 40 and basic.keys() == fsdp.keys()
    for key, values in basic.items():
        assert fsdp[key] == pytest.approx(values, rel=1e-5), key
    assert fsdp_path == (runs['fsdp_dpo_precomputed'] / 'cache_path.txt').read_text()
    assert fsdp_path != str(reference_cache_path(basic_config, load_tokenizer(basic_config), 1, 'cpu'))
