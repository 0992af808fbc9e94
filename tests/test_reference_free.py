"""Losses without a reference model load none: SimPO always, loss.reference_free=true unless β-DPO reads the
reference margin. The run trains end to end and logs SimPO's loss of its first step exactly."""
import json
import math

import pytest
import torch

from helpers import FAST, compose_config, run_dir_from_output, run_train, start_run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('overrides', [['loss=simpo'], ['loss=dpo', 'loss.beta=0.1', 'loss.reference_free=true']])
def test_no_reference_model_is_built(tmp_path, overrides):
    import train
    config = compose_config([*FAST, *overrides], tmp_path)
    _, reference_model = train.build_run_models(config, train.prepare_run(config))
    assert reference_model is None
    trainer = start_run([*FAST, *overrides], tmp_path / 'run')
    assert trainer.reference.uniform and trainer.reference.model is None
    batch = trainer.local(next(iter(trainer.train_batches())))
    chosen, rejected = trainer.reference(batch)
    assert torch.equal(chosen, torch.zeros(8)) and torch.equal(rejected, torch.zeros(8))


def test_simpo_step_loss_is_eq6_of_the_mean_log_probs(tmp_path):
    """The trainer's SimPO loss of a batch (β = 2, γ = 0.5) is the mean over its 8 pairs of −log σ(2·h − 0.5), h the gap of
    the responses' mean token log-probs computed by the same forward pass: no reference term anywhere."""
    trainer = start_run([*FAST, 'loss=simpo'], tmp_path)
    batch = trainer.local(next(iter(trainer.train_batches())))
    with torch.no_grad():
        loss, metrics = trainer.get_batch_metrics(batch, train=True)
        chosen, rejected = trainer.concatenated_forward(trainer.policy, batch)
    counts = (batch['chosen_labels'][:, 1:] != -100).sum(-1)
    assert torch.all(chosen > -20) and counts.min() > 1  # means per token, not sums over several tokens
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics['rewards_train/chosen'] == pytest.approx((2.0 * chosen).tolist(), rel=1e-6)


def test_simpo_trains_end_to_end(tmp_path):
    """python train.py loss=simpo: two steps and two evaluations, every logged loss finite, the last checkpoint and
    the line to pass the run on."""
    result = run_train([*FAST, 'loss=simpo', 'n_examples=16', 'minimum_log_interval_secs=0', 'eval_every=16'], tmp_path)
    run_dir = run_dir_from_output(result.stdout)
    records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['split'] for r in records] == ['eval', 'train', 'train', 'eval']
    assert all(math.isfinite(r['loss/' + r['split']]) for r in records)
    assert f'To train from this run: model.archive={run_dir}/LATEST/policy.pt' in result.stdout
