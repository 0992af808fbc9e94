"""precompute_ref_log_probs: the cached reference log-probabilities give the losses of the in-memory
reference model, the model is freed, and the cache is keyed by what decides its values."""
import gc
import weakref

import pytest
import torch

from helpers import FAST, compose_config
from train import build_run_models, prepare_run
from reference_cache import load_reference_cache, reference_cache_path
from trainers import BasicTrainer

DPO = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=24', 'optimizer=SGD', 'lr=0.1']


def make_trainer(tmp_path, overrides):
    """A DPO trainer whose policy is perturbed away from the reference (margins are not all 0)."""
    config = compose_config([*DPO, *overrides], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.setup_optimization()
    return trainer, weakref.ref(reference)


def three_step_losses(trainer):
    return [trainer.train_step(batch)['loss/train'] for batch in trainer.train_batches()]


@pytest.mark.slow
def test_precomputed_reference_gives_the_same_losses_and_frees_the_model(tmp_path, capsys):
    """3 SGD steps of DPO (24 examples, batch 8): the losses with the cached reference log-probabilities
    equal those with the reference model in memory (same batches, same forward: equal to float32
    rounding), and after the precompute no reference model is alive. The cache holds the 24 training
    pairs and the 8 evaluation pairs; a second run finds all 32 and computes none."""
    in_memory, _ = make_trainer(tmp_path, [])
    expected = three_step_losses(in_memory)
    assert len(expected) == 3 and expected[0] != pytest.approx(expected[2])

    cached, reference_alive = make_trainer(tmp_path, ['precompute_ref_log_probs=true'])
    cached.precompute_reference_logps()
    gc.collect()
    assert cached.reference.model is None and reference_alive() is None
    assert len(cached.reference.cache) == 32
    assert three_step_losses(cached) == pytest.approx(expected, rel=1e-6, abs=1e-7)

    again, _ = make_trainer(tmp_path, ['precompute_ref_log_probs=true'])
    capsys.readouterr()
    again.precompute_reference_logps()
    assert 'of 32 pairs (0 computed now)' in capsys.readouterr().out
    assert load_reference_cache(again.reference_cache_file()) == cached.reference.cache


@pytest.mark.slow
def test_cache_key_changes_with_what_changes_the_values(tmp_path):
    """The cache file changes with model.archive (and when the archive is rewritten), the data (datasets, the
    synthetic task's options), the length settings, the precision (reference dtype, TF32, the head's chunking)
    and the layout (trainer, processes, device type); it stays for what does not change the reference's values:
    seed, n_examples, lr, the loss, and model.fsdp_policy_mp (the policy's compute dtype only)."""
    archive = tmp_path / 'policy.pt'
    archive.write_bytes(b'weights one')

    from models import load_tokenizer
    tokenizer = load_tokenizer(compose_config(DPO, tmp_path))  # the same for every variant below

    def path(*overrides, world_size=1, device_type='cpu'):
        return reference_cache_path(compose_config([*DPO, *overrides], tmp_path), tokenizer, world_size, device_type)

    base = path()
    assert path('seed=3', 'n_examples=64', 'lr=0.5', 'loss.beta=0.3', 'loss.mode_loss=beta_DPO',
                'model.fsdp_policy_mp=bfloat16') == base
    with_archive = path(f'model.archive={archive}')
    assert with_archive != base
    archive.write_bytes(b'weights two, longer')
    assert path(f'model.archive={archive}') != with_archive
    changed = [path('synthetic.n_train=65'), path('max_length=80'), path('max_prompt_length=32'),
               path('model.reference_dtype=bfloat16'), path('allow_tf32=false'), path('logps_chunk_size=null'),
               path('trainer=FSDPTrainer', world_size=2), path('trainer=TensorParallelTrainer', world_size=2),
               path('trainer=FSDPTrainer', world_size=4), path(device_type='cuda')]
    assert len({base, *changed}) == 1 + len(changed)
