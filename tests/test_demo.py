"""`make demo` shortened: experiments/demo.py --quick runs SFT → pairs sampled from it → DPO and β-DPO through
train.py and scripts/sample_pairs.py, shows each stage on the console and writes the report; scripts/plot_run.py
plots any run directory. (The full demo is measured by hand, see docs/experiments.md.)"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from experiments import stages
from helpers import ROOT, TRAIN_ENV
from synthetic_task import synthetic_gold_answer

pytestmark = pytest.mark.slow

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
FIGURES = {'gold_accuracy.png', 'loss.png', 'reward_margins.png', 'reward_accuracy.png', 'beta.png'}


def run_script(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, **TRAIN_ENV), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    """The quick demo run from a folder outside the repository: its output folder and its console output."""
    out = tmp_path_factory.mktemp('demo') / 'report'
    result = run_script([str(ROOT / 'experiments' / 'demo.py'), '--quick', '--threads', '1', '--out', str(out)],
                        cwd=tmp_path_factory.getbasetemp())
    return SimpleNamespace(out=out, stdout=result.stdout)


@pytest.fixture(scope='module')
def quick_demo(quick_run):
    return quick_run.out


def test_quick_demo_shows_each_stage_and_ends_with_the_report(quick_run):
    """The console: for each of the 5 stages its command as typed from the repository root, a line naming its log
    file when it starts and one with its time when it ends; the last line is the report's path. The bars' meters
    read the stages' real logs: SFT trained 32 of 32 examples, the pairs stage answered 64 of 64 prompts."""
    logs = quick_run.out / 'logs'
    stage_logs = {'SFT': 'sft_seed0', 'pairs': 'pairs_seed0', 'DPO': 'dpo_seed0', 'β-DPO': 'beta_dpo_seed0',
                  'SFT continued': 'sft_more_seed0'}
    for what, log in stage_logs.items():
        assert f'[seed 0] {what}: started, its output in {logs / log}.log\n' in quick_run.stdout, what
        assert f'\n[seed 0] {what}: done in ' in quick_run.stdout, what
    assert "[seed 0] SFT: python train.py 'datasets=[synthetic]' model=tiny " in quick_run.stdout
    assert '[seed 0] pairs: python scripts/sample_pairs.py ' in quick_run.stdout
    assert quick_run.stdout.rstrip().splitlines()[-1] == f'Report: {(quick_run.out / "report.md").resolve()}'
    assert stages.TRAINING.reading((logs / 'sft_seed0.log').read_text()) == (32, 32)
    assert stages.PROMPTS.reading((logs / 'pairs_seed0.log').read_text()) == (64, 64)


def test_quick_demo_writes_the_report_figures_and_results(quick_demo):
    """Four training stages for seed 0; the table has a row per method, SFT's Δ and rewards as '—' (the
    control's rewards too), Δ is the change from SFT; the stages after SFT started from its LATEST/policy.pt and
    trained on the pairs sampled from it (one per prompt of 64 the SFT model got wrong, gold chosen unless
    flipped); β-DPO logged its β and kept 6 of each batch of 8 (ρ = 0.2: ⌊8 · 0.8⌋ = 6, 0.75); every figure is a
    PNG."""
    results = json.loads((quick_demo / 'results.json').read_text())
    assert [(r['seed'], r['method']) for r in results] == [(0, 'SFT'), (0, 'DPO'), (0, 'β-DPO'), (0, 'SFT continued')]
    for r in results:
        assert 0 <= r['final_eval']['gold_eval/accuracy'] <= 1 and r['final_eval']['counters/examples'] == 32
    sft_dir = results[0]['run_dir']
    pairs = quick_demo.resolve() / 'pairs' / 'seed0.jsonl'
    pair_rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert 0 < len(pair_rows) <= 64
    assert all((r['rejected'] if r['flipped'] else r['chosen']) == ' ' + synthetic_gold_answer(r['prompt'])
               for r in pair_rows)
    for r in results[1:]:
        config = (ROOT / r['run_dir'] / 'config.yaml').read_text()
        assert f'archive: {sft_dir}/LATEST/policy.pt' in config and f'train_pairs: {pairs}' in config
    assert results[1]['beta_mean'] == pytest.approx(0.5) and results[1]['kept_mean'] is None
    assert results[2]['kept_mean'] == pytest.approx(0.75)

    report = (quick_demo / 'report.md').read_text()
    rows = [line for line in report.splitlines() if line.startswith(('| SFT |', '| DPO |', '| β-DPO |', '| SFT continued |'))]
    assert len(rows) == 4 and rows[0].split(' | ')[2:5] == ['—', '—', '—'] and rows[3].split(' | ')[3:5] == ['—', '—']
    sft_gold = results[0]['final_eval']['gold_eval/accuracy']
    for r in results[1:]:
        assert r['gold_change'] == pytest.approx(r['final_eval']['gold_eval/accuracy'] - sft_gold)
    assert '| method | gold accuracy | Δ gold vs SFT | reward accuracy | reward margin |' in report
    assert f'- seed 0: {len(pair_rows)} pairs from 64 prompts' in report
    assert f'python scripts/sample_pairs.py {sft_dir} --out {pairs} --seed 0' in report
    assert "\npython train.py 'datasets=[synthetic]' model=tiny n_epochs=null " in report
    assert all(r['command'].startswith('python train.py ') for r in results)
    for name in FIGURES:
        assert (quick_demo / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f'({name})' in report
    assert (quick_demo / 'logs' / 'beta_dpo_seed0.log').is_file()


def test_plot_run_plots_any_run_directory(quick_demo, tmp_path):
    """plot_run.py on the β-DPO run: all five figures; on the SFT run only loss and gold accuracy (no rewards,
    no β); a folder without metrics.jsonl is a usage error naming the file."""
    results = json.loads((quick_demo / 'results.json').read_text())
    beta_dir, sft_dir = results[2]['run_dir'], results[0]['run_dir']
    run_script([str(ROOT / 'scripts' / 'plot_run.py'), beta_dir, '--out', str(tmp_path / 'beta')], cwd=tmp_path)
    assert {p.name for p in (tmp_path / 'beta').iterdir()} == FIGURES
    printed = run_script([str(ROOT / 'scripts' / 'plot_run.py'), sft_dir], cwd=tmp_path).stdout
    assert {p.name for p in (ROOT / sft_dir / 'plots').iterdir()} == {'loss.png', 'gold_accuracy.png'}
    assert 'loss.png' in printed
    result = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'plot_run.py'), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and 'metrics.jsonl does not exist' in result.stderr
