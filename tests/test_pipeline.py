"""The whole two-stage pipeline through the real entry point: SFT → LATEST/policy.pt → β-DPO."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from helpers import FAST, run_dir_from_output, run_train
from models import build_model

pytestmark = pytest.mark.slow

TRAIN_KEYS = {'loss/train', 'logps_train/chosen', 'examples_per_second', 'grad_norm', 'counters/examples',
              'counters/updates'}
DPO_TRAIN_KEYS = TRAIN_KEYS | {'rewards_train/chosen', 'rewards_train/rejected', 'rewards_train/accuracies',
                               'rewards_train/margins', 'rewards_train/logratio_margins', 'logps_train/rejected'}
BETA_DPO_KEYS = {'record_train/beta_used', 'record_train/mask_count', 'record_train/gap_mean', 'record_train/gap_std'}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pipeline')
    result = run_train([*FAST, f'local_dirs=[{tmp}]', 'loss=sft', 'exp_name=sft', 'n_examples=32', 'eval_every=16',
                        'minimum_log_interval_secs=0', 'lr=1e-3'], cwd=tmp)
    return tmp, run_dir_from_output(result.stdout)


def test_sft_run_writes_checkpoints_metrics_and_a_loadable_export(sft_run):
    _, run_dir = sft_run
    assert (run_dir / 'config.yaml').is_file()
    assert sorted(p.name for p in run_dir.glob('step-*')) == ['step-16', 'step-32']
    assert (run_dir / 'LATEST').resolve() == (run_dir / 'step-32').resolve()
    for name in ('policy.pt', 'optimizer.pt', 'scheduler.pt', 'trainer_state.pt', 'beta_dpo_stats.json'):
        assert (run_dir / 'LATEST' / name).is_file(), name
    archive = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)
    assert set(archive) == {'step_idx', 'state', 'metrics'} and archive['step_idx'] == 32
    assert 'loss/eval' in archive['metrics']

    lines = read_metrics(run_dir)
    train_lines = [m for m in lines if m['split'] == 'train']
    assert [m['counters/examples'] for m in train_lines] == [8, 16, 24, 32]
    assert all(TRAIN_KEYS <= set(m) for m in train_lines)
    assert [m['counters/examples'] for m in lines if m['split'] == 'eval'] == [0, 16, 32]
    # SFT lowers the loss on the preferred responses
    evals = [m['loss/eval'] for m in lines if m['split'] == 'eval']
    assert evals[-1] < evals[0]

    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'hf_model')
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, archive['state'][key], rtol=0, atol=0)
    assert (run_dir / 'hf_model' / 'model.safetensors').is_file()
    assert (run_dir / 'hf_model' / 'tokenizer.json').is_file()


def test_beta_dpo_from_the_sft_archive(sft_run):
    """The first DPO loss is ln 2 (policy == reference, both loaded from the archive). ρ = 0 keeps all 8 pairs, so
    each step's β is recomputable from the log: with M̄_t the batch's mean margin (rewards_train/logratio_margins),
    μ_t = 0.9·μ_{t−1} + 0.1·M̄_t (updated before β is read, μ_0 = 0) and β_t = 0.1·(1 + 0.6·(M̄_t − μ_t)) (Eq. 6);
    at the first step M̄_1 = μ_1 = 0 and β_1 = β0 = 0.1. The statistics are saved, and the export is the policy."""
    tmp, sft_dir = sft_run
    result = run_train([*FAST, f'local_dirs=[{tmp}]', 'loss=dpo', 'loss.mode_loss=beta_DPO', 'loss.beta=0.1',
                        'loss.mode_weight=0', 'loss.a=0.6', f'model.archive={sft_dir}/LATEST/policy.pt',
                        'exp_name=beta_dpo', 'n_examples=32', 'eval_every=16', 'minimum_log_interval_secs=0',
                        'lr=1e-3'], cwd=tmp)
    run_dir = run_dir_from_output(result.stdout)
    lines = read_metrics(run_dir)
    first_eval = next(m for m in lines if m['split'] == 'eval')
    assert first_eval['loss/eval'] == pytest.approx(math.log(2), abs=1e-5)
    train_lines = [m for m in lines if m['split'] == 'train']
    assert train_lines[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-5)
    assert all(DPO_TRAIN_KEYS | BETA_DPO_KEYS <= set(m) for m in train_lines)
    assert [m['record_train/mask_count'] for m in train_lines] == [8, 8, 8, 8]
    mu = 0.0
    for m in train_lines:
        mean_margin = m['rewards_train/logratio_margins']
        mu = 0.9 * mu + 0.1 * mean_margin
        assert m['record_train/gap_mean'] == pytest.approx(mu, rel=1e-4, abs=1e-7)
        assert m['record_train/beta_used'] == pytest.approx(max(1e-3, 0.1 * (1 + 0.6 * (mean_margin - mu))), rel=1e-5)
        # the rewards logged with β_used are that β times the margins: the loss read the logged β
        assert m['rewards_train/margins_beta_used'] == pytest.approx(m['record_train/beta_used'] * mean_margin,
                                                                     rel=1e-4, abs=1e-7)
    assert train_lines[0]['record_train/beta_used'] == pytest.approx(0.1, abs=1e-7)
    # not vacuous: the margins moved, and β with them (measured: 0.1, 0.105, 0.126, 0.188 over the 4 steps)
    assert train_lines[-1]['rewards_train/logratio_margins'] > 0.5
    stats = json.loads((run_dir / 'LATEST' / 'beta_dpo_stats.json').read_text())
    assert stats['mean'] == pytest.approx(train_lines[-1]['record_train/gap_mean'], rel=1e-6)
    assert stats['std'] == pytest.approx(train_lines[-1]['record_train/gap_std'], rel=1e-6)
    assert_export_is_the_policy(run_dir)


def assert_export_is_the_policy(run_dir):
    """hf_model/ is the preset's model (the run's config.yaml) with LATEST/policy.pt's weights: the same config,
    parameter count and logits on a batch."""
    policy = build_model(OmegaConf.load(run_dir / 'config.yaml'), 'float32', None)
    policy.load_state_dict(torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)['state'])
    exported = AutoModelForCausalLM.from_pretrained(run_dir / 'hf_model')
    assert type(exported) is type(policy)
    assert {k: v for k, v in exported.config.to_diff_dict().items() if k != '_name_or_path'} == \
        {k: v for k, v in policy.config.to_diff_dict().items() if k != '_name_or_path'}
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in policy.parameters())
    input_ids = torch.tensor([list(b'\n\nHuman: reverse cab\n\nAssistant: bac'),
                              list(b'\n\nHuman: reverse xyz\n\nAssistant: zyx')])
    with torch.no_grad():
        assert torch.equal(exported.eval()(input_ids).logits, policy.eval()(input_ids).logits)


def test_debug_mode_writes_no_checkpoints(tmp_path):
    result = run_train([*FAST, f'local_dirs=[{tmp_path}]', 'debug=true', 'n_examples=16', 'eval_every=8'], cwd=tmp_path)
    run_dir = run_dir_from_output(result.stdout)
    assert 'skipping save in debug mode' in result.stdout
    assert not list(run_dir.glob('step-*')) and not (run_dir / 'LATEST').exists()
    assert not (run_dir / 'hf_model').exists()
