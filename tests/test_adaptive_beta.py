"""ε-DPO (Lee et al. 2025) and KTO (Ethayarajh et al. 2024) beside β-DPO: worked numbers of the losses and of β,
ε-DPO's perturbed log-probabilities against the naive full-logits computation, and the first step of each run."""
import json
import math

import pytest
import torch
import torch.nn as nn

from helpers import FAST, compose_config, start_run, train_in_process
from losses import EpsilonBeta, epsilon_betas, epsilon_steps, kto_loss, kto_reference_point
from logps import perturbed_label_logps
from preference_datasets import mismatched_batch, mismatched_partners


def test_kto_loss_worked_numbers():
    # policy = reference, z0 = 0: 1 − σ(0) = 0.5 on each half, ½·(0.5 + 0.5) = 0.5
    assert kto_loss(torch.zeros(3), torch.zeros(3), 0.0, 0.1).tolist() == pytest.approx([0.5] * 3)
    # r_c = 2, r_r = −1, z0 = 0.5, β = 1: ½·[(1 − σ(1.5)) + 2·(1 − σ(1.5))] = ½·3·0.182426 = 0.273639
    value = kto_loss(torch.tensor([2.0]), torch.tensor([-1.0]), 0.5, 1.0, desirable_weight=1.0, undesirable_weight=2.0)
    assert value.item() == pytest.approx(0.273639, abs=1e-6)
    # z0: the mismatched mean (0.2 + 0.6 − 0.2)/3 = 0.2; a negative mean clamps to 0
    assert kto_reference_point(torch.tensor([0.2, 0.6, -0.2])).item() == pytest.approx(0.2)
    assert kto_reference_point(torch.tensor([-0.2, -0.6])).item() == 0.0


def test_epsilon_steps_and_betas_worked_numbers():
    l = torch.tensor([1.0, 1.0, 1.0, 1.0])
    plus = torch.tensor([1.5, 0.5, 1.0, 2.0])
    minus = torch.tensor([0.5, 1.5, 1.0, 3.0])
    steps = epsilon_steps(l, plus, minus)
    assert steps.tolist() == [1.0, -1.0, 0.0, 0.0]   # ℓ⁺ > ℓ > ℓ⁻; ℓ⁻ > ℓ > ℓ⁺; ties; both above
    assert epsilon_betas(0.1, 0.01, steps).tolist() == pytest.approx([0.1 / 1.01, 0.1 / 0.99, 0.1, 0.1])
    baseline = EpsilonBeta(0.1, 0.01)
    baseline.update(0.5)                             # β ← 0.1 / (1 + 0.01·0.5) = 0.0995025
    assert baseline.beta == pytest.approx(0.0995025, abs=1e-7)


def test_perturbed_logps_match_the_full_logits():
    torch.manual_seed(0)
    vocab, hidden_size = 11, 5
    policy_head, reference_head = nn.Linear(hidden_size, vocab), nn.Linear(hidden_size, vocab, bias=False)
    hp, hr = torch.randn(2, 6, hidden_size), torch.randn(2, 6, hidden_size)
    labels = torch.randint(0, vocab, (2, 6))
    labels[0, :3] = -100
    labels[1, :2] = -100
    labels[1, 5] = -100
    eps = 0.3
    got = perturbed_label_logps(hp, policy_head, hr, reference_head, labels, eps, chunk_size=3)
    zp, zr = policy_head(hp), reference_head(hr)
    mask = labels[:, 1:] != -100
    for value, logits in zip(got, (zr, (1 + eps) * zp - eps * zr, (1 - eps) * zp + eps * zr)):
        token = logits[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
        torch.testing.assert_close(value, (token * mask).sum(-1), rtol=1e-5, atol=1e-5)


def test_mismatched_pairs():
    assert mismatched_partners(4) == [1, 0, 3, 2] and mismatched_partners(3) == [1, 0, 0]
    batch = {'chosen_input_ids': torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]]),
             'chosen_attention_mask': torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             'chosen_labels': torch.tensor([[-100, 6, 7, -100], [-100, -100, 10, 11]])}
    out = mismatched_batch(batch)
    # prompt [5] + completion [10, 11] of pair 1; prompt [8, 9] + completion [6, 7] of pair 0; right-padded
    assert out['input_ids'].tolist() == [[5, 10, 11, 0], [8, 9, 6, 7]]
    assert out['labels'].tolist() == [[-100, 10, 11, -100], [-100, -100, 6, 7]]
    assert out['attention_mask'].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.slow
@pytest.mark.parametrize('overrides, first_loss', [
    (['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=epsilon_DPO'], math.log(2)),
    (['loss=kto', 'loss.beta=0.1'], 0.5),
    (['loss=kto', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6'], 0.5)])
def test_first_step_at_policy_equal_reference(tmp_path, overrides, first_loss):
    """policy = reference: ε-DPO's steps are all 0 (β_i = β, loss ln 2), KTO's z0 is 0 (loss 0.5); a step then trains."""
    trainer = start_run([*FAST, *overrides], tmp_path)
    batch = trainer.local(next(iter(trainer.train_batches())))
    loss, metrics = trainer.get_batch_metrics(batch, train=False)
    assert loss.item() == pytest.approx(first_loss, abs=1e-5)
    if 'loss.mode_loss=epsilon_DPO' in overrides:
        assert metrics['epsilon_eval/steps'] == [0.0] * 8 and metrics['epsilon_eval/beta'] == pytest.approx([0.1] * 8)
    else:
        assert metrics['kto_eval/z0'] == [0.0]
    step_metrics = trainer.train_step(next(iter(trainer.train_batches())))
    assert math.isfinite(step_metrics['loss/train'])


@pytest.mark.parametrize('overrides, needle', [
    (['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=epsilon_DPO', 'precompute_ref_log_probs=true'],
     'precompute_ref_log_probs'),
    (['loss=kto', 'loss.beta=0.1', 'precompute_ref_log_probs=true'], 'precompute_ref_log_probs'),
    (['loss=kto', 'loss.beta=0.1', 'loss.reference_free=true'], 'loss.reference_free=false'),
    (['loss=dpo', 'loss.beta=0.1', 'loss.epsilon=0.05'], 'loss.epsilon=0.05 does nothing'),
    (['loss=ipo', 'loss.beta=0.1', 'loss.mode_loss=epsilon_DPO'], 'sigmoid loss only'),
    (['loss=kto', 'loss.beta=0.1', 'batch_size=2', 'gradient_accumulation_steps=2'], 'at least 2 pairs')])
def test_refused_combinations(tmp_path, overrides, needle):
    from config_schema import validate_config
    problems = validate_config(compose_config([*FAST, *overrides], tmp_path))
    assert any(needle in p for p in problems), problems


@pytest.mark.slow
def test_epsilon_dpo_resume_continues_with_the_saved_beta(tmp_path):
    """ε-DPO's baseline β is in the checkpoint: a run of 6 steps saved at 32 and 48 examples, resumed from its
    step-32 checkpoint (LATEST pointed back to it), logs the same metrics as it did uninterrupted, bitwise (the
    baseline β at 40 and 48 examples included); the saved β has moved from β0 = 0.1 (the first three steps' s̄ are
    0 on the tiny model, the fourth's is not), so a resume that restarted at β0 would log another β."""
    from checkpoints import point_latest_to
    args = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=epsilon_DPO', 'n_examples=48', 'eval_every=32',
            'do_first_eval=false', 'minimum_log_interval_secs=0', 'lr=1e-2', f'local_dirs=[{tmp_path}]']
    run_dir = train_in_process(args, tmp_path)
    uninterrupted = (run_dir / 'metrics.jsonl').read_text().splitlines()
    saved = torch.load(run_dir / 'step-32' / 'trainer_state.pt', weights_only=True)['epsilon_beta']
    assert saved != 0.1
    point_latest_to(run_dir, 'step-32')
    train_in_process([*args, f'resume_from={run_dir}'], tmp_path)

    def without_time(lines):
        return [{k: v for k, v in json.loads(line).items() if k != 'examples_per_second'} for line in lines]
    resumed = without_time((run_dir / 'metrics.jsonl').read_text().splitlines())
    assert resumed == without_time(uninterrupted)
    first_after = next(r for r in resumed if r['split'] == 'train' and r['counters/examples'] == 40)
    assert first_after['epsilon_train/baseline_beta'] == pytest.approx(saved)
