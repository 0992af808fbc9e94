"""python evaluate.py end to end: gold reproduces train.py's gold_eval/accuracy, results.json / samples.jsonl / plots,
the win rate of a pairwise judge, and bad inputs named before anything is generated."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import shared
from eval_helpers import eval_config, save_letter_judge, save_reward_model
from evaluate import evaluate, mean_and_stderr, win_rate_summary
from helpers import ROOT, TRAIN_ENV

pytestmark = pytest.mark.slow


def last_gold_accuracy(run_dir: Path) -> float:
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [m for m in lines if 'gold_eval/accuracy' in m][-1]['gold_eval/accuracy']


def test_gold_reproduces_the_runs_gold_eval_accuracy(short_sft_run, tmp_path):
    """judge=gold at temperature 0 on the run's first 64 test prompts is the run's last gold_eval/accuracy, and each
    greedy answer is the text the trainer's own generate() decodes for that prompt (answers such as ' iii' and
    ' ccccccc', all ending with EOS well within the budget, so the budget does not matter)."""
    import trainers
    from generation import load_model
    from preference_datasets import get_batch_iterator
    out = tmp_path / 'gold'
    results = evaluate(eval_config([f'model={short_sft_run}', 'judge=gold', 'temperatures=[0]', 'n_prompts=64',
                                    'max_new_tokens=48', f'out={out}'], tmp_path))
    greedy = results['temperatures'][0]
    assert greedy['mean_score'] == last_gold_accuracy(short_sft_run) and greedy['n'] == 64
    assert greedy['stopped_fraction'] == 1.0 and results['chosen']['mean'] == 1.0

    config = OmegaConf.load(short_sft_run / 'config.yaml')
    policy = load_model(str(short_sft_run), 'cpu').model
    trainer = trainers.BasicTrainer(policy, config, config.seed, str(tmp_path / 'scratch'), device=torch.device('cpu'))
    assert trainer.gold_eval() == {'gold_eval/accuracy': greedy['mean_score']}
    batches = get_batch_iterator(**{**trainer.data_kwargs, 'names': ['synthetic'], 'shuffle': False, 'sft_mode': True,
                                    'silent': True}, split='test', n_epochs=1, n_examples=64,
                                 batch_size=config.eval_batch_size)
    trainer_answers = {prompt: text[len(prompt):] for batch in batches
                       for prompt, text in zip(batch['prompt'], trainer.generate(policy, batch, do_sample=False))}
    ours = {row['prompt']: row['completion'] for row in map(json.loads, (out / 'samples.jsonl').read_text().splitlines())}
    assert ours == trainer_answers
    assert len(set(ours.values())) > 3


def test_results_samples_and_plots_with_a_reference(short_sft_run, tmp_path):
    """A reward model as judge, 1 greedy sample and 3 at T=0.7 and T=1 per prompt, the run as its own reference. The
    KL(π_T‖π_ref) estimate is 0 at T = 1 only: positive at T = 0.7 (π_0.7 is not π), and at T = 0 (greedy, a point
    mass: logp_sampling 0) each sample's −log π_ref. Each sample's score and log-probabilities are in samples.jsonl,
    results.json says what the KL is, and the plots are written."""
    reward_model = save_reward_model(tmp_path / 'rm')
    out = tmp_path / 'out'
    results = evaluate(eval_config([f'model={short_sft_run}', f'reference={short_sft_run}', f'judge=reward:{reward_model}',
                                    'temperatures=[0,0.7,1.0]', 'n_samples=3', 'n_prompts=5', 'max_new_tokens=12',
                                    f'out={out}'], tmp_path))
    assert [t['temperature'] for t in results['temperatures']] == [0.0, 0.7, 1.0]
    assert [t['n'] for t in results['temperatures']] == [5, 15, 15]
    greedy, tempered, plain = (t['kl'] for t in results['temperatures'])
    assert plain == {'mean': 0.0, 'stderr': 0.0}
    assert tempered['mean'] > 2 * tempered['stderr'] > 0
    assert results['kl_definition'].startswith('KL(π_T‖π_ref) per sequence')
    rows = [json.loads(line) for line in (out / 'samples.jsonl').read_text().splitlines()]
    assert len(rows) == 35 and all(r['kl'] == r['logp_sampling'] - r['logp_reference'] for r in rows)
    assert all(r['kl'] == 0.0 for r in rows if r['temperature'] == 1.0)
    assert all(r['logp_sampling'] == 0.0 and r['kl'] == -r['logp_reference'] for r in rows if r['temperature'] == 0)
    assert greedy['mean'] == pytest.approx(sum(-r['logp_reference'] for r in rows if r['temperature'] == 0) / 5)
    sampled = [r['score'] for r in rows if r['temperature'] == 0.7]
    assert results['temperatures'][1]['mean_score'] == pytest.approx(sum(sampled) / 15)
    assert json.loads((out / 'results.json').read_text()) == results
    assert {p.name for p in out.glob('*.png')} == {'score_vs_temperature.png', 'score_vs_kl.png'}


def test_a_judge_without_verdicts_gives_no_win_rate(short_sft_run, tmp_path, capsys):
    """A local judge model that always answers 'C', no verdict: results.json has no win rate (None) and 12 unparsed
    verdicts for 6 pairs, the printed line says so, and no win-rate plot is drawn from nothing."""
    judge = save_letter_judge(tmp_path / 'judge', 'C', tmp_path)
    results = evaluate(eval_config([f'model={short_sft_run}', f'judge=llm:{judge}', 'datasets=[synthetic]',
                                    'temperatures=[1.0]', 'n_prompts=6', 'max_new_tokens=8', f'out={tmp_path / "out"}'],
                                   tmp_path))
    summary = results['temperatures'][0]
    assert (summary['win_rate'], summary['ci95'], summary['n'], summary['unparsed_verdicts']) == (None, None, 6, 12)
    assert 'T=1: no verdicts (all 12 verdicts of 6 pairs unparsed): no win rate' in capsys.readouterr().out
    assert not list((tmp_path / 'out').glob('*.png'))


def test_a_judge_answering_a_wins_half_of_the_pairs(short_sft_run, tmp_path):
    """HH prompts (the real slice), a local judge model that always answers 'A': every pair scores ½ after the order
    swap, so the win rate is 0.5 with a zero-width interval; no verdict is unreadable."""
    slice_dir = tmp_path / 'hh'
    slice_dir.mkdir()
    (slice_dir / 'test.jsonl.gz').symlink_to(shared('hh-rlhf', 'harmless-base-test.jsonl.gz'))
    judge = save_letter_judge(tmp_path / 'judge', 'A', tmp_path)
    results = evaluate(eval_config([f'model={short_sft_run}', f'datasets=[hh:{slice_dir}]', f'judge=llm:{judge}',
                                    'temperatures=[1.0]', 'n_prompts=6', 'max_new_tokens=8', f'out={tmp_path / "out"}'],
                                   tmp_path))
    assert results['pairwise'] and results['temperatures'][0]['win_rate'] == 0.5
    assert results['temperatures'][0]['ci95'] == [0.5, 0.5]
    assert results['temperatures'][0]['n'] == 6 and results['temperatures'][0]['unparsed_verdicts'] == 0
    assert (tmp_path / 'out' / 'win_rate_vs_temperature.png').is_file()


def test_win_rate_interval_and_standard_error_worked_numbers():
    """Pair scores 1, 1, 0, ½: mean 0.625, s = √(0.229167) = 0.478714, s/√4 = 0.239357, 95% interval
    0.625 ± 1.959964 · 0.239357 = [0.155869, 1.094131], clipped to [0.155869, 1]."""
    summary = win_rate_summary([1, 1, 0, 0.5])
    assert summary['win_rate'] == 0.625 and summary['n'] == 4
    assert summary['ci95'] == pytest.approx([0.155869, 1.0], abs=1e-6)
    assert mean_and_stderr([1.0, 2.0, 4.0]) == pytest.approx({'mean': 7 / 3, 'stderr': 0.881917, 'n': 3}, abs=1e-6)


def test_bad_inputs_are_named_before_anything_is_generated(tmp_path, short_sft_run, monkeypatch):
    """python evaluate.py with an unknown judge and a directory that is no model: both named in one message, and no
    output directory is made. A data source without prompts and an unreachable endpoint fail the same way."""
    (tmp_path / 'empty').mkdir()
    env = dict(os.environ, **TRAIN_ENV)
    result = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), f'model={tmp_path / "empty"}', 'judge=gpt4',
                             f'out={tmp_path / "out"}', f'local_dirs=[{tmp_path}]'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f'model={tmp_path / "empty"}: not a model directory' in result.stderr
    assert "judge='gpt4' is unknown; use gold, sentiment, reward:PATH, llm:PATH or api:MODEL" in result.stderr
    assert not (tmp_path / 'out').exists()

    ten_rows = tmp_path / 'ten.jsonl'
    ten_rows.write_text(''.join(json.dumps({'prompt': f'q{i}', 'chosen': 'a', 'rejected': 'b'}) + '\n' for i in range(10)))
    with pytest.raises(ValueError, match=r"datasets: '.*ten.jsonl' has no prompts in its test split"):
        evaluate(eval_config([f'model={short_sft_run}', f'datasets=[{ten_rows}]', 'judge=sentiment',
                              f'out={tmp_path / "out"}'], tmp_path))
    monkeypatch.setenv('OPENAI_API_KEY', 'none')
    monkeypatch.setenv('OPENAI_BASE_URL', 'http://127.0.0.1:9/v1')  # nothing listens on port 9 (discard)
    with pytest.raises(ValueError, match=r'judge=api:gpt-4: cannot reach the endpoint http://127.0.0.1:9/v1'):
        evaluate(eval_config([f'model={short_sft_run}', 'judge=api:gpt-4', f'out={tmp_path / "out"}'], tmp_path))
    with pytest.raises(ValueError, match=r"judge=gold checks the synthetic task only; use datasets=\[synthetic\]"):
        evaluate(eval_config([f'model={short_sft_run}', 'datasets=[hh]', f'out={tmp_path / "out"}'], tmp_path))
    assert not (tmp_path / 'out').exists()
