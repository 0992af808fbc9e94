"""The experiments' reports (demo.py, demo_real.py, real_hh.py): the line saying what ran where and how long, markdown
tables, mean ± sd over seeds, the figures, the commands and run directories, report.md and results.json.

    lines = ['# Title', '', header_line('experiments/demo.py', ['torch threads per stage: 1'], total_s), '',
             markdown_table(['method', 'accuracy'], [['DPO', summary([0.5, 0.7], '{:.3f}')]]), '',
             *figure_lines(figures), '', *commands_section('Commands', commands),
             *run_dirs_section([('DPO, seed 0', run_dir)])]
    path = write_report(out, lines, results)   # OUT/report.md and OUT/results.json, each written atomically
"""
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import plots


def header_line(script: str, details: Sequence[str], total_s: float, note: str = '') -> str:
    """'`python SCRIPT ARGS` on HOST (MACHINE, N CPUs usable, DETAILS, load average at the end 1.0 / 0.9 / 0.8),
    DATE, M minutes in all.' and the note: the command as typed from the repository root (the arguments of this
    process), where and when it ran."""
    load = ' / '.join(f'{x:.1f}' for x in os.getloadavg())
    machine = [platform.machine(), f'{len(os.sched_getaffinity(0))} CPUs usable', *details,
               f'load average at the end {load}']
    return (f'`{shlex.join(["python", script, *sys.argv[1:]])}` on {platform.node()} ({", ".join(machine)}), '
            f'{time.strftime("%Y-%m-%d %H:%M")}, {total_s / 60:.1f} minutes in all.' + (f' {note}' if note else ''))


def summary(values: Sequence[Optional[float]], fmt: str) -> str:
    """'v' for one value, 'mean ± sd (min–max)' for several (the sample standard deviation), '—' when the metric
    does not apply."""
    values = [v for v in values if v is not None]
    if not values:
        return '—'
    if len(values) == 1:
        return fmt.format(values[0])
    return (f'{fmt.format(statistics.fmean(values))} ± {fmt.replace("+", "").format(statistics.stdev(values))} '
            f'({fmt.format(min(values))}–{fmt.format(max(values))})')


def markdown_table(headings: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """A markdown table; `align` has an 'l' (left) or 'r' (right) per column, by default the first column left
    and the others right (numbers)."""
    align = align or 'l' + 'r' * (len(headings) - 1)
    assert len(align) == len(headings) and all(len(row) == len(headings) for row in rows), (align, headings)
    rule = ''.join('|---' if a == 'l' else '|---:' for a in align) + '|'
    return '\n'.join(['| ' + ' | '.join(headings) + ' |', rule, *('| ' + ' | '.join(row) + ' |' for row in rows)])


def figure_lines(figures: Sequence[Optional[Path]]) -> List[str]:
    """A markdown image per figure written (None: a figure with nothing to plot)."""
    return [f'![{f.stem}]({f.name})' for f in figures if f is not None]


def commands_section(title: str, commands: Sequence[str]) -> List[str]:
    return [f'## {title}', '', '```sh', *commands, '```', '']


def run_dirs_section(entries: Sequence[Tuple[str, Path]]) -> List[str]:
    return ['## Run directories', '', *(f'- {label}: `{run_dir}`' for label, run_dir in entries), '']


def write_report(out: Path, lines: Sequence[str], results) -> Path:
    """OUT/report.md (the lines) and OUT/results.json (every number of the tables), each written atomically."""
    from checkpoints import atomic_write_text
    path = out / 'report.md'
    atomic_write_text(path, '\n'.join(lines).rstrip('\n') + '\n')
    atomic_write_text(out / 'results.json', json.dumps(results, indent=1) + '\n')
    return path


@dataclass
class RunMetrics:
    """What a training run's metrics.jsonl says: its evaluations in order, its steps, and the mean over the steps
    of the adaptive β (β-DPO's batch-level β, ε-DPO's per-pair β) and of the fraction β-DPO's filter kept (None where
    the run logged none)."""
    evals: List[Dict[str, float]]
    steps: int
    beta_mean: Optional[float]
    kept_mean: Optional[float]


def run_metrics(run_dir: Path) -> RunMetrics:
    records = plots.read_metrics(run_dir)
    train = [r for r in records if r['split'] == 'train']
    # β-DPO's batch-level β; ε-DPO's mean per-pair β of the step
    betas = [r.get('record_train/beta_used', r.get('epsilon_train/beta')) for r in train
             if 'record_train/beta_used' in r or 'epsilon_train/beta' in r]
    kept = [r['record_train/kept_fraction'] for r in train if 'record_train/kept_fraction' in r]
    return RunMetrics([r for r in records if r['split'] == 'eval'], len(train),
                      statistics.fmean(betas) if betas else None, statistics.fmean(kept) if kept else None)
