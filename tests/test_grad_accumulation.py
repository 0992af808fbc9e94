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

pytestmark = pytest.mark.slow  # each builds two trainers and steps them (4-20 s)


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


class RecordingBetaDPO(BetaDPO):
    """Records every training β-DPO decision: the margins it read, the β of each pair and the kept mask."""

    def decide(self, margins, train):
        decision = super().decide(margins, train)
        if train:
            self.margins.append(margins.clone())
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
    trainer.beta_dpo.margins, trainer.beta_dpo.decisions = [], []
    trainer.setup_optimization()
    metrics = trainer.train_step(next(iter(trainer.train_batches())))
    update = torch.cat([p.detach().flatten() for p in policy.parameters()]) - initial
    return metrics, update, trainer


def dpo_losses(beta, margins):
    """−log σ(β·m) of each pair: DPO's loss without label smoothing."""
    return -torch.nn.functional.logsigmoid(beta * margins)


def test_beta_dpo_statistics_are_per_microbatch_by_design(tmp_path):
    """Both runs read the same 8 margins m (the policy moves only after the step). One microbatch of 8: one decision,
    k = ⌊8·0.8⌋ = 6 kept; μ = 0.1·mean(m), σ = 0.1·std(m) (one EMA update from 0, momentum 0.9);
    β = 0.1·(1 + 0.6·(mean of the 6 kept − μ)), and loss/train is the mean of −log σ(β·m_i) over all 8.
    Eight microbatches of 1: k = max(1, ⌊0.8⌋) = 1, every pair kept; μ_i = 0.9·μ_{i−1} + 0.1·m_i, eight times,
    σ from single margins (std 0) stays 0; pair i gets β_i = 0.1·(1 + 0.6·(m_i − μ_i)), and loss/train is the
    mean of −log σ(β_i·m_i)."""
    beta_dpo = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6']
    whole, _, whole_trainer = one_recorded_step(tmp_path / 'a', beta_dpo, accumulation=1)
    accumulated, _, accumulated_trainer = one_recorded_step(tmp_path / 'b', beta_dpo, accumulation=8)
    [m] = whole_trainer.beta_dpo.margins
    assert m.shape == (8,) and [t.shape for t in accumulated_trainer.beta_dpo.margins] == [(1,)] * 8
    torch.testing.assert_close(torch.cat(accumulated_trainer.beta_dpo.margins), m, rtol=1e-5, atol=1e-6)

    [(whole_betas, keep)] = whole_trainer.beta_dpo.decisions
    mu = 0.1 * m.mean()
    beta = 0.1 * (1 + 0.6 * (m[keep].mean() - mu))
    assert int(keep.sum()) == whole['record_train/mask_count'] == 6
    stats = whole_trainer.beta_dpo.margin_stats
    assert (stats.mean.item(), stats.std.item()) == (pytest.approx(mu.item(), rel=1e-5),
                                                     pytest.approx(0.1 * m.std().item(), rel=1e-5))
    torch.testing.assert_close(whole_betas, beta.expand(8), rtol=1e-6, atol=0)
    assert whole['loss/train'] == pytest.approx(dpo_losses(beta, m).mean().item(), rel=1e-5)

    mus = []
    for m_i in m.tolist():
        mus.append(0.9 * (mus[-1] if mus else 0.0) + 0.1 * m_i)
    betas = 0.1 * (1 + 0.6 * (m - torch.tensor(mus)))
    assert accumulated['record_train/mask_count'] == 1
    assert all(keep_i.tolist() == [True] for _, keep_i in accumulated_trainer.beta_dpo.decisions)
    torch.testing.assert_close(torch.cat([b for b, _ in accumulated_trainer.beta_dpo.decisions]), betas,
                               rtol=1e-5, atol=1e-7)
    stats = accumulated_trainer.beta_dpo.margin_stats
    assert (stats.mean.item(), stats.std.item()) == (pytest.approx(mus[-1], rel=1e-5), 0.0)
    assert accumulated['loss/train'] == pytest.approx(dpo_losses(betas, m).mean().item(), rel=1e-5)


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
