"""Gradient accumulation: batch 8 × 1 step equals batch 1 × 8 accumulation steps for SFT and DPO.

β-DPO differs by design at loss.beta_dpo_scope=microbatch (the default): its statistics, β and filter are
per microbatch (as in the reference implementation), so 8 microbatches of one pair each keep every pair and
update μ, σ eight times. At loss.beta_dpo_scope=step it decides once per step, and 4 × 2 equals 1 × 8.
"""
import pytest
import torch

from helpers import FAST, compose_config
from train import build_run_models, prepare_run
from losses import BetaDPO
from trainers import BasicTrainer


def one_step(tmp_path, overrides, accumulation, perturb=False):
    """Loss, metrics and updated policy parameters after one SGD step on the first training batch."""
    config = compose_config([*FAST, 'optimizer=SGD', 'lr=0.5', 'max_grad_norm=1e9', 'n_examples=8',
                             f'gradient_accumulation_steps={accumulation}', *overrides], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    if perturb:  # move the policy away from the reference so the margins are not all 0
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    initial = torch.cat([p.detach().flatten() for p in policy.parameters()])
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.setup_optimization()
    batch = next(iter(trainer.train_batches()))
    metrics = trainer.train_step(batch)
    update = torch.cat([p.detach().flatten() for p in policy.parameters()]) - initial
    return metrics, update, trainer


@pytest.mark.parametrize('loss', [['loss=sft'], ['loss=dpo', 'loss.beta=0.1'], ['loss=ipo', 'loss.beta=0.1'],
                                  ['loss=dpo', 'loss.beta=0.1', 'loss.label_smoothing=0.2']])
def test_batch_of_8_equals_8_accumulated_microbatches(tmp_path, loss):
    whole, whole_params, _ = one_step(tmp_path / 'a', loss, accumulation=1, perturb=True)
    accumulated, accumulated_params, _ = one_step(tmp_path / 'b', loss, accumulation=8, perturb=True)
    assert accumulated['loss/train'] == pytest.approx(whole['loss/train'], rel=1e-5)
    assert accumulated['grad_norm'] == pytest.approx(whole['grad_norm'], rel=1e-4)
    # the SGD update is lr × gradient: equal up to float32 summation order
    scale = whole_params.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(accumulated_params, whole_params, rtol=1e-4, atol=1e-5 * scale)


def test_beta_dpo_statistics_are_per_microbatch_by_design(tmp_path):
    """One microbatch of 8: k = ⌊8·0.8⌋ = 6 pairs kept, μ and σ updated once.
    Eight microbatches of 1: k = max(1, ⌊0.8⌋) = 1 each, so every pair is kept, and μ, σ are updated
    8 times, σ from single margins (std 0): σ stays 0 and μ is an 8-step EMA. The loss differs."""
    beta_dpo = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6']
    whole, whole_params, whole_trainer = one_step(tmp_path / 'a', beta_dpo, accumulation=1, perturb=True)
    accumulated, accumulated_params, accumulated_trainer = one_step(tmp_path / 'b', beta_dpo, accumulation=8,
                                                                    perturb=True)
    assert whole['record_train/mask_count'] == 6
    assert accumulated['record_train/mask_count'] == 1
    assert whole_trainer.beta_dpo.margin_stats.std.item() > 0
    assert accumulated_trainer.beta_dpo.margin_stats.std.item() == 0
    assert accumulated_trainer.beta_dpo.margin_stats.mean.item() != pytest.approx(whole_trainer.beta_dpo.margin_stats.mean.item())
    assert accumulated['loss/train'] != pytest.approx(whole['loss/train'], rel=1e-3)
    assert not torch.allclose(accumulated_params, whole_params)


class RecordingBetaDPO(BetaDPO):
    """Records every training β-DPO decision: the β of each pair and the kept mask."""

    def decide(self, margins, train):
        decision = super().decide(margins, train)
        if train:
            self.decisions.append((decision.betas.clone(), decision.keep.clone()))
        return decision


def one_recorded_step(tmp_path, overrides, accumulation):
    config = compose_config([*FAST, 'optimizer=SGD', 'lr=0.5', 'max_grad_norm=1e9', 'n_examples=8',
                             f'gradient_accumulation_steps={accumulation}', *overrides], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as one_step(perturb=True): margins that differ, so the filter has something to choose
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    initial = torch.cat([p.detach().flatten() for p in policy.parameters()])
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.beta_dpo = RecordingBetaDPO(config.loss, config.seed, trainer.device)  # nothing drawn yet: the same
    trainer.beta_dpo.decisions = []
    trainer.setup_optimization()
    metrics = trainer.train_step(next(iter(trainer.train_batches())))
    update = torch.cat([p.detach().flatten() for p in policy.parameters()]) - initial
    return metrics, update, trainer


@pytest.mark.parametrize('level', ['batch', 'instance'])
def test_beta_dpo_step_scope_4x2_equals_1x8(tmp_path, level):
    """loss.beta_dpo_scope=step: 4 accumulated microbatches of 2 pairs decide β-DPO once over the 8 pairs of the
    step, from margins computed without gradients first. One decision, k = ⌊8·0.75⌋ = 6 kept, the same β (per
    pair at beta_level=instance), kept set, statistics, loss and SGD update as one microbatch of 8."""
    beta_dpo = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.25', 'loss.a=0.6',
                'loss.beta_dpo_scope=step', f'loss.beta_level={level}']
    whole, whole_update, whole_trainer = one_recorded_step(tmp_path / 'a', beta_dpo, accumulation=1)
    accumulated, accumulated_update, accumulated_trainer = one_recorded_step(tmp_path / 'b', beta_dpo, accumulation=4)
    assert len(whole_trainer.beta_dpo.decisions) == len(accumulated_trainer.beta_dpo.decisions) == 1
    (whole_betas, whole_keep), (accumulated_betas, accumulated_keep) = (whole_trainer.beta_dpo.decisions[0],
                                                                        accumulated_trainer.beta_dpo.decisions[0])
    assert int(whole_keep.sum()) == 6 and torch.equal(accumulated_keep, whole_keep)
    torch.testing.assert_close(accumulated_betas, whole_betas, rtol=1e-6, atol=0)
    if level == 'instance':
        assert whole_betas.unique().numel() > 1  # the pairs' β really differ
    assert accumulated['record_train/mask_count'] == whole['record_train/mask_count'] == 6
    assert accumulated['record_train/beta_used'] == pytest.approx(whole['record_train/beta_used'], rel=1e-6)
    assert accumulated_trainer.beta_dpo.margin_stats.state_dict() == pytest.approx(whole_trainer.beta_dpo.margin_stats.state_dict())
    assert accumulated['loss/train'] == pytest.approx(whole['loss/train'], rel=1e-5)
    assert accumulated['grad_norm'] == pytest.approx(whole['grad_norm'], rel=1e-4)
    scale = whole_update.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(accumulated_update, whole_update, rtol=1e-4, atol=1e-5 * scale)
