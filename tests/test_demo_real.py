"""`make demo-real` shortened: demo_real.py --quick runs the whole experiment on the real SmolLM2-135M-Instruct (the
task, pairs of its own samples labelled by VADER, DPO, β-DPO and the SFT control with LoRA, evaluation of reward and
KL on held-out prompts) with a few prompts and steps, and writes the report; the report's verdicts worked by hand.
(The reduced and full experiments are measured by hand, see the README's "The real experiment".)"""
import io
import json
import os
import subprocess
import sys

import pytest

import tqdm

from experiments import demo_real, stages
from experiments.demo_real import Outcome, RunSpec
from helpers import ROOT, TRAIN_ENV

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def outcome(method, beta, reward, reward_se, kl, seed=0, condition='clean'):
    return Outcome(RunSpec(method, beta, condition, seed), seed, reward, reward_se, kl, 0.1, 20.0)


def test_beta_dpo_against_dpo_worked():
    """β = 0.1: β-DPO 0.65 ± 0.04 at KL 4.0 against DPO 0.60 ± 0.03 at KL 5.0: +0.050 (± √(0.03² + 0.04²) = 0.050)
    at 1.00 nat less, β-DPO dominates; β = 0.5: β-DPO 0.40 at KL 2.0 against DPO 0.30 at KL 1.0, a trade-off; runs
    without a partner (the control, another seed) are not compared."""
    outcomes = [outcome('dpo', 0.1, 0.60, 0.03, 5.0), outcome('beta_dpo', 0.1, 0.65, 0.04, 4.0),
                outcome('dpo', 0.5, 0.30, 0.02, 1.0), outcome('beta_dpo', 0.5, 0.40, 0.02, 2.0),
                outcome('sft', None, 0.5, 0.03, 3.0), outcome('beta_dpo', 0.1, 0.7, 0.03, 3.0, seed=1)]
    assert demo_real.comparisons(outcomes) == [
        '- clean, β = 0.1, seed 0: β-DPO − DPO: reward +0.050 (± 0.050, one standard error of the difference), KL -1.00 '
        'nats: β-DPO dominates (higher or equal reward at lower or equal KL).',
        '- clean, β = 0.5, seed 0: β-DPO − DPO: reward +0.100 (± 0.028, one standard error of the difference), KL +1.00 '
        'nats: a trade-off: the one with the higher reward also has the higher KL.']


def test_results_table_summarises_seeds():
    """One seed: the value ± its standard error; two seeds (rewards 0.6 and 0.8): mean 0.700 ± sd 0.141 (min–max);
    the base model first, then DPO before β-DPO before the control; columns a method lacks read '—'. Δ reward per
    nat: the control gains 0.5 − 0.2 = +0.300 at KL 3.0, 0.100 per nat; DPO +0.4 at 5.0 and +0.6 at 7.0, 0.080 and
    0.086 per nat."""
    base = Outcome(None, 0, 0.2, 0.05, 0.0, 0.0, 28.0)
    runs = [outcome('sft', None, 0.5, 0.03, 3.0), outcome('dpo', 0.1, 0.6, 0.03, 5.0),
            outcome('dpo', 0.1, 0.8, 0.03, 7.0, seed=1)]
    for run in runs:
        run.reward_gain = run.reward - base.reward
    rows = demo_real.results_table([*runs, base]).splitlines()[2:]
    assert rows[0].startswith('| — | SmolLM2-Instruct (start) | 1 | 0.200 ± 0.050 | 0.00 ± 0.00 | — | — | 28.0 | — |')
    assert rows[1].startswith('| clean | DPO, β = 0.1 | 2 | 0.700 ± 0.141 (0.600–0.800) | 6.00 ± 1.41 (5.00–7.00) | '
                              '+0.500 ± 0.141 (+0.400–+0.600) | 0.083 ± 0.004 (0.080–0.086) |')
    assert rows[2].startswith('| clean | SFT on chosen (control) | 1 | 0.500 ± 0.030 | 3.00 ± 0.10 | +0.300 | 0.100 |')


@pytest.mark.slow
def test_quick_experiment_end_to_end(smollm2_local_dirs, tmp_path):
    """demo_real.py --quick: 4 training prompts, 2 samples each; the base model, DPO, β-DPO and the control each
    evaluated on 2 held-out prompts; the base model against itself has KL exactly 0; every run trained with LoRA on
    the sampled pairs (each row's score gap = chosen − rejected VADER scores) and saved its merged hf_model/; the
    report has the table, the comparison and the figures."""
    root, _ = smollm2_local_dirs
    out = tmp_path / 'report'
    result = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'demo_real.py'), '--quick', '--out', str(out), '--local-dir',
                             str(root)], cwd=tmp_path, env=dict(os.environ, **TRAIN_ENV), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f'{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    results = json.loads((out / 'results.json').read_text())
    assert [(r['method'], r['beta'], r['condition']) for r in results] == [
        ('base', None, None), ('dpo', 0.1, 'clean'), ('beta_dpo', 0.1, 'clean'), ('sft', None, 'clean')]
    assert results[0]['kl'] == 0.0
    for r in results:
        assert -1 <= r['reward'] <= 1 and r['mean_new_tokens'] <= 7
    from judges import make_judge
    vader = make_judge('sentiment')
    pairs = [json.loads(line) for line in (out / 'pairs' / 'clean_seed0' / 'train.jsonl').read_text().splitlines()]
    assert 1 <= len(pairs) <= 4
    for row in pairs:
        chosen, rejected = vader.score(['', ''], [row['chosen'][0]['content'], row['rejected'][0]['content']])
        assert row['score_gap'] == pytest.approx(chosen - rejected) and row['gap_kind'] in ('low', 'high')
    report = (out / 'report.md').read_text()
    assert '| clean | β-DPO, β = 0.1 | 1 |' in report and '- clean, β = 0.1, seed 0: β-DPO − DPO' in report
    for name in ('frontier.png', 'beta.png', 'loss.png'):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    for tool in ('experiments/sentiment_task.py', 'scripts/sample_pairs.py', 'evaluate.py', 'train.py'):
        assert f'\npython {tool} ' in report, tool

    # the console: each of the 8 jobs named with its log file when it starts, its time and outcome when it ends,
    # the report's path last; the bars' meters read the jobs' real logs
    logs = out / 'logs'
    jobs = ['pairs_clean_seed0', 'eval_base_seed0', *(f'{m}_clean_seed0' for m in ('dpo_beta0.1', 'beta_dpo_beta0.1', 'sft'))]
    for job in jobs + [f'eval_{j}' for j in jobs[2:]]:
        assert f'{job}: started, its output in {logs / job}.log\n' in result.stdout, job
        assert f'\n{job}: done in ' in result.stdout, job
    assert ' pairs from 4 prompts' in result.stdout.split('pairs_clean_seed0: done in ', 1)[1].splitlines()[0]
    assert ', T=1: mean score ' in result.stdout.split('\neval_base_seed0: done in ', 1)[1].splitlines()[0]
    assert result.stdout.rstrip().splitlines()[-1] == f'Report: {out / "report.md"}'
    assert stages.SAMPLING.reading((logs / 'pairs_clean_seed0.log').read_text()) == (8, 8)
    assert stages.SAMPLING.reading((logs / 'eval_base_seed0.log').read_text()) == (2, 2)
    # n_examples=null: the log counts the examples of the one epoch, the pairs in whole batches of 2
    assert stages.TRAINING.reading((logs / 'dpo_beta0.1_clean_seed0.log').read_text()) == (len(pairs) // 2 * 2, None)


def test_commands_are_absolute_and_shown_as_typed_from_the_root():
    """A tool is launched by its absolute path (any working directory works) and shown as typed from the root."""
    command = stages.python_command('scripts/sample_pairs.py', 'RUN DIR', '--seed', '0')
    assert command == [sys.executable, str(ROOT / 'scripts' / 'sample_pairs.py'), 'RUN DIR', '--seed', '0']
    assert stages.typed(command) == "python scripts/sample_pairs.py 'RUN DIR' --seed 0"
    assert stages.typed(stages.python_command('train.py', 'loss=sft')) == 'python train.py loss=sft'


def test_meters_read_the_last_state_of_a_tqdm_bar():
    """The meters read what tqdm writes to a log (bars as the trainer and generate make them): the last state,
    with the bar's total, or the meter's where the bar has none; nothing before the bar starts."""
    def bar_output(desc, unit, total, steps):
        log = io.StringIO()
        with tqdm.tqdm(total=total, desc=desc, unit=unit, file=log, mininterval=0) as bar:
            for step in steps:
                bar.update(step)
        return 'Writing to host:/run\n' + log.getvalue()
    assert stages.TRAINING.reading(bar_output('Training', 'ex', 32, [8, 8, 8])) == (24, 32)
    assert stages.TRAINING.reading(bar_output('Training', 'ex', None, [8, 8])) == (16, None)
    assert stages.TRAINING.with_total(24).reading(bar_output('Training', 'ex', None, [8, 8])) == (16, 24)
    assert stages.SAMPLING.reading(bar_output('Sampling (T=1)', 'sample', 8, [2, 2, 2])) == (6, 8)
    assert stages.TRAINING.reading(bar_output('Computing eval metrics', 'it', 4, [4])) is None
    assert stages.PROMPTS.reading('\r16/64 prompts, 3 pairs, 1 s\r32/64 prompts, 5 pairs, 2 s') == (32, 64)


@pytest.mark.slow
def test_jobs_run_after_their_inputs_and_recorded_outputs_are_reused(tmp_path):
    """b runs after a and reads what a wrote; a second run_jobs with the same command for a reuses its recorded
    output (a is not run again: its file keeps the first run's text), a changed command runs again; a failing job
    stops the rest with the end of its log."""
    from experiments.stages import Job, run_jobs
    made = tmp_path / 'a.txt'

    def write(text):
        return lambda done: [sys.executable, '-c', f'open({str(made)!r}, "a").write({text!r}); print("wrote {text}")']
    jobs = [Job('b', lambda done: [sys.executable, '-c', f'print(open({str(made)!r}).read())'], after=('a',)),
            Job('a', write('first'), output=made)]
    done = run_jobs(jobs, tmp_path, parallel=2, threads=1)
    assert done['b'].log_text.strip() == 'first' and done['a'].log_text.strip() == 'wrote first'
    again = run_jobs(jobs, tmp_path, parallel=2, threads=1)
    assert made.read_text() == 'first' and again['a'].log_text == done['a'].log_text
    changed = run_jobs([Job('a', write('second'), output=made)], tmp_path, parallel=1, threads=1)
    assert made.read_text() == 'firstsecond' and changed['a'].log_text.strip() == 'wrote second'
    with pytest.raises(RuntimeError, match=r"c failed with exit code 3.*\n.*boom"):
        run_jobs([Job('c', lambda done: [sys.executable, '-c', 'print("boom"); raise SystemExit(3)'])], tmp_path, 1, 1)


def test_compare_plans_every_method_with_its_own_overrides(tmp_path):
    """--compare: DPO, β-DPO, ε-DPO, SimPO at β0 = 0.1 (γ = 0.55·β = 0.055), SimPO at its paper's β 2.5 (γ 1.375)
    and KTO, each condition and seed; ε-DPO and KTO without the precomputed reference, SimPO reference-free."""
    args = demo_real.parse_args(['--compare', '--train-prompts', '32'])
    assert (args.conditions, args.seeds, demo_real.run_sizes(args).n_train_prompts) == (['clean', 'noisy'], [0, 1, 2], 32)
    specs = demo_real.run_specs(args, 'noisy', 1)
    assert [s.name for s in specs] == ['dpo_beta0.1_noisy_seed1', 'beta_dpo_beta0.1_noisy_seed1',
                                       'epsilon_dpo_beta0.1_noisy_seed1', 'simpo_beta0.1_noisy_seed1',
                                       'kto_beta0.1_noisy_seed1', 'simpo_paper_beta2.5_noisy_seed1']
    overrides = {s.method: demo_real.train_overrides(s, tmp_path, demo_real.SIZES, tmp_path) for s in specs}
    assert overrides['epsilon_dpo']['loss.mode_loss'] == 'epsilon_DPO'
    assert [overrides[m]['precompute_ref_log_probs'] for m in ('dpo', 'beta_dpo', 'epsilon_dpo', 'kto')] == [
        'true', 'true', 'false', 'false']
    assert (overrides['simpo']['loss'], overrides['simpo']['loss.gamma']) == ('simpo', '0.055')
    assert (overrides['simpo_paper']['loss.beta'], overrides['simpo_paper']['loss.gamma']) == ('2.5', '1.375')
    assert overrides['kto']['loss'] == 'kto' and overrides['kto']['loss.beta'] == '0.1'


def test_method_differences_over_seeds_worked():
    """ε-DPO − DPO over two seeds: rewards +0.10 and +0.02 → mean +0.060, sd 0.0566, se 0.040: within 2 standard
    errors; KL −1 and −3 → −2.00 ± 1.00: |−2| is not below 2·1, so it counts as lower."""
    outcomes = [outcome('dpo', 0.1, 0.50, 0.03, 5.0), outcome('epsilon_dpo', 0.1, 0.60, 0.03, 4.0),
                outcome('dpo', 0.1, 0.40, 0.03, 6.0, seed=1), outcome('epsilon_dpo', 0.1, 0.42, 0.03, 3.0, seed=1)]
    assert demo_real.method_differences(outcomes) == [
        '- clean, ε-DPO, β = 0.1 − DPO (β = 0.1), 2 seed(s): reward +0.060 ± 0.040 (within 2 standard errors); '
        'KL -2.00 ± 1.00 (lower).']
