"""What the logs mean, against the original (junkangwu/beta-DPO trainers.py): the rewards are scaled by the
configured β0 with β-DPO's β_used versions beside them, loss/{split} is every pair's loss and loss/{split}_kept
what the step optimizes; with reference_free the filter and β still read the margin with the reference term;
an evaluation draws its filter masks from one generator seeded once per evaluation.

Each test rebuilds the logged values from the same forward passes (BasicTrainer.concatenated_forward and the
reference) and the public loss functions, replaying the filter's generator from its saved state.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import FAST, compose_config
from train import build_run_models, prepare_run
from losses import BetaDPO, dynamic_beta, logratio_margins
from trainers import BasicTrainer

pytestmark = pytest.mark.slow  # each builds a trainer and runs its steps (2-5 s)

# ρ = 0.25: 6 of each 8 pairs kept; 32 test prompts give 4 evaluation batches of 8
BETA_DPO = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.25', 'loss.a=0.6',
            'synthetic.n_test=32', 'n_eval_examples=32']


class RecordingBetaDPO(BetaDPO):
    """Records each call's (margins, keep mask, β) of the β-DPO filter."""

    def batch_beta_and_mask(self, margins, train):
        beta, keep = super().batch_beta_and_mask(margins, train)
        self.records.append((margins.clone(), keep.clone(), beta.item()))
        return beta, keep


def make_trainer(tmp_path, overrides, perturb=True):
    """A β-DPO trainer; `perturb` moves the policy away from the reference so the margins are not all 0."""
    config = compose_config([*BETA_DPO, *overrides], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    if perturb:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.beta_dpo = RecordingBetaDPO(config.loss, config.seed, trainer.device)  # nothing drawn yet: the same
    trainer.beta_dpo.records = []
    return trainer


def forward(trainer, batch):
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probabilities, no gradient."""
    with torch.no_grad():
        return (*trainer.concatenated_forward(trainer.policy, batch), *trainer.reference(batch))


def first_train_batch(trainer):
    return trainer.local(next(iter(trainer.train_batches())))


def test_rewards_use_beta0_and_losses_cover_every_pair(tmp_path):
    """One training microbatch of 8 pairs: with m = margins, β_used and the kept 6 pairs replayed from the
    filter's generator state, the logs hold rewards_train/chosen = β0·(log π_c − log π_ref,c) (the original's),
    rewards_train/chosen_beta_used = β_used·(…), loss/train = −log σ(β_used·m) of all 8 pairs (the original's),
    loss/train_kept = their mean over the 6 kept pairs, which is the loss returned for the backward pass."""
    trainer = make_trainer(tmp_path, [])
    batch = first_train_batch(trainer)
    generator_state = trainer.beta_dpo.filter_generator.get_state()
    loss, metrics = trainer.get_batch_metrics(batch, train=True)

    policy_c, policy_r, reference_c, reference_r = forward(trainer, batch)
    margins = logratio_margins(policy_c, policy_r, reference_c, reference_r)
    stats = trainer.beta_dpo.margin_stats  # updated with this batch before the filter read it
    beta_used, keep = dynamic_beta(margins, stats.mean, stats.std, beta=0.1, a=0.6, mode_weight=0.25,
                                   generator=torch.Generator().set_state(generator_state))
    assert int(keep.sum()) == 6 and abs(beta_used.item() - 0.1) > 1e-4
    assert metrics['record_train/beta_used'] == [pytest.approx(beta_used.item(), rel=1e-6)]
    chosen, rejected = policy_c - reference_c, policy_r - reference_r
    close = dict(rel=1e-5, abs=1e-7)
    assert metrics['rewards_train/chosen'] == pytest.approx((0.1 * chosen).tolist(), **close)
    assert metrics['rewards_train/rejected'] == pytest.approx((0.1 * rejected).tolist(), **close)
    assert metrics['rewards_train/margins'] == pytest.approx((0.1 * margins).tolist(), **close)
    assert metrics['rewards_train/chosen_beta_used'] == pytest.approx((beta_used * chosen).tolist(), **close)
    assert metrics['rewards_train/margins_beta_used'] == pytest.approx((beta_used * margins).tolist(), **close)
    assert metrics['rewards_train/accuracies'] == (chosen > rejected).float().tolist()
    every_pair = -F.logsigmoid(beta_used * margins)
    assert metrics['loss/train'] == pytest.approx(every_pair.tolist(), **close)
    assert metrics['loss/train_kept'] == [pytest.approx(every_pair[keep].mean().item(), rel=1e-5)]
    assert loss.item() == pytest.approx(every_pair[keep].mean().item(), rel=1e-5)
    assert every_pair[keep].mean().item() != pytest.approx(every_pair.mean().item(), rel=1e-4)


def test_plain_dpo_logs_no_beta_used_or_kept_versions(tmp_path):
    """loss.mode_loss=mean: β_used = β0 and every pair is kept, so only the original's keys are logged."""
    # β-DPO's switches back at their defaults: set with mode_loss=mean they would be refused as doing nothing
    trainer = make_trainer(tmp_path, ['loss.mode_loss=mean', 'loss.mode_weight=0.2', 'loss.a=0.0'])
    _, metrics = trainer.get_batch_metrics(first_train_batch(trainer), train=True)
    assert not [key for key in metrics if key.endswith(('_beta_used', '_kept')) or key.startswith('record_')]
    assert len(metrics['loss/train']) == 8 and len(metrics['rewards_train/chosen']) == 8


def test_reference_free_filter_reads_the_margin_with_the_reference(tmp_path):
    """loss.reference_free=true: the loss uses π_c − π_r only, while β-DPO's statistics, filter and β read
    m = (π_c − π_r) − (ref_c − ref_r), as the original's A_gap does; β from the reference-free margins would
    differ."""
    trainer = make_trainer(tmp_path, ['loss.reference_free=true'])
    batch = first_train_batch(trainer)
    generator_state = trainer.beta_dpo.filter_generator.get_state()
    _, metrics = trainer.get_batch_metrics(batch, train=True)

    policy_c, policy_r, reference_c, reference_r = forward(trainer, batch)
    margins = logratio_margins(policy_c, policy_r, reference_c, reference_r)
    recorded_margins, keep, beta = trainer.beta_dpo.records[0]
    torch.testing.assert_close(recorded_margins, margins, rtol=1e-5, atol=1e-6)
    assert metrics['rewards_train/logratio_margins'] == pytest.approx(margins.tolist(), rel=1e-5, abs=1e-6)
    free_margins = policy_c - policy_r
    free_beta, _ = dynamic_beta(free_margins, trainer.beta_dpo.margin_stats.mean, trainer.beta_dpo.margin_stats.std, beta=0.1, a=0.6,
                                mode_weight=0.25, generator=torch.Generator().set_state(generator_state))
    assert abs(free_beta.item() - beta) > 1e-3
    assert metrics['loss/train'] == pytest.approx((-F.logsigmoid(beta * free_margins)).tolist(), rel=1e-5)


def test_an_evaluation_seeds_its_filter_generator_once(tmp_path):
    """At the first evaluation policy = reference, so all margins are 0, σ = 0 and every pair weighs 1: the
    4 evaluation batches' masks (6 of 8) are 4 consecutive draws of one generator seeded seed + step = 0,
    so they differ (re-seeding per batch gave 4 identical masks). Evaluating again at the same step draws the
    same masks; evaluation leaves the training generator where it was."""
    trainer = make_trainer(tmp_path, [], perturb=False)
    training_state = trainer.beta_dpo.filter_generator.get_state()
    trainer.evaluate()
    masks = [keep for _, keep, _ in trainer.beta_dpo.records]
    assert len(masks) == 4 and all(int(keep.sum()) == 6 for keep in masks)
    assert all(margins.abs().max().item() == 0 for margins, _, _ in trainer.beta_dpo.records)
    generator = torch.Generator().manual_seed(trainer.seed + trainer.example_counter)
    replayed = [dynamic_beta(torch.zeros(8), 0.0, 0.0, beta=0.1, a=0.6, mode_weight=0.25, generator=generator)[1]
                for _ in masks]
    assert [m.tolist() for m in masks] == [m.tolist() for m in replayed]
    assert len({tuple(m.tolist()) for m in masks}) > 1
    trainer.beta_dpo.records = []
    trainer.evaluate()
    assert [keep.tolist() for _, keep, _ in trainer.beta_dpo.records] == [m.tolist() for m in masks]
    assert torch.equal(trainer.beta_dpo.filter_generator.get_state(), training_state)
