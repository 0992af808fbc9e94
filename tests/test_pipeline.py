"""The whole two-stage pipeline through the real entry point: SFT → LATEST/policy.pt → β-DPO."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAST, run_dir_from_output, run_train

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
    """The first DPO loss is ln 2 (policy == reference, both loaded from the archive); β-DPO's β
    leaves β0 = 0.1 once the margins move; the running statistics are logged and saved."""
    tmp, sft_dir = sft_run
    result = run_train([*FAST, f'local_dirs=[{tmp}]', 'loss=dpo', 'loss.mode_loss=beta_DPO', 'loss.beta=0.1',
                        'loss.mode_weight=0.2', 'loss.a=0.6', f'model.archive={sft_dir}/LATEST/policy.pt',
                        'exp_name=beta_dpo', 'n_examples=32', 'eval_every=16', 'minimum_log_interval_secs=0',
                        'lr=1e-3'], cwd=tmp)
    run_dir = run_dir_from_output(result.stdout)
    lines = read_metrics(run_dir)
    first_eval = next(m for m in lines if m['split'] == 'eval')
    assert first_eval['loss/eval'] == pytest.approx(math.log(2), abs=1e-5)
    train_lines = [m for m in lines if m['split'] == 'train']
    assert train_lines[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-5)
    assert all(DPO_TRAIN_KEYS | BETA_DPO_KEYS <= set(m) for m in train_lines)
    assert train_lines[0]['record_train/mask_count'] == 6  # ⌊8 · 0.8⌋
    betas = [m['record_train/beta_used'] for m in train_lines]
    assert betas[0] == pytest.approx(0.1)  # every margin is 0 at the first step
    assert max(abs(b - 0.1) for b in betas[1:]) > 1e-4
    stats = json.loads((run_dir / 'LATEST' / 'beta_dpo_stats.json').read_text())
    assert stats['std'] > 0 and stats['std'] == pytest.approx(train_lines[-1]['record_train/gap_std'], rel=1e-6)
    assert AutoModelForCausalLM.from_pretrained(run_dir / 'hf_model') is not None


def test_debug_mode_writes_no_checkpoints(tmp_path):
    result = run_train([*FAST, f'local_dirs=[{tmp_path}]', 'debug=true', 'n_examples=16', 'eval_every=8'], cwd=tmp_path)
    run_dir = run_dir_from_output(result.stdout)
    assert 'skipping save in debug mode' in result.stdout
    assert not list(run_dir.glob('step-*')) and not (run_dir / 'LATEST').exists()
    assert not (run_dir / 'hf_model').exists()
