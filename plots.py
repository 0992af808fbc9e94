"""Figures of a run's metrics.jsonl: loss, reward margins, gold accuracy, β used and kept fraction.

    python scripts/plot_run.py RUN_DIR                      # PNGs into RUN_DIR/plots/ (the command-line tool)

    from plots import curves_of_runs, plot_curves
    plot_curves(curves_of_runs([DPO_RUN, BETA_RUN], ['DPO', 'β-DPO']), OUT)    # several runs on the same axes

RUN_DIR is the directory train.py announces ('Writing to DIR'). Each figure is written only if some run
logged its metrics: loss.png (train and eval), reward_margins.png, reward_accuracy.png, gold_accuracy.png
(datasets=[synthetic]), beta.png (β-DPO's β used and kept fraction; plain DPO runs show their fixed β).
The experiments (experiments/) draw their reports' figures with the same functions.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

# Figures are only written to files: the non-interactive backend needs no display.
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown')


@dataclass
class Curve:
    """One run's metrics to draw: `label` in the legend, x shifted by `x_offset` examples, drawn in `color`."""
    label: str
    records: List[Dict]
    color: str
    x_offset: int = 0
    beta: Optional[float] = None
    config: Dict = field(default_factory=dict)


def read_metrics(run_dir: Path) -> List[Dict]:
    """The JSON records of RUN_DIR/metrics.jsonl; ValueError if the file is missing or malformed."""
    path = Path(run_dir) / 'metrics.jsonl'
    if not path.is_file():
        raise ValueError(f'{path} does not exist: pass a run directory written by train.py (it prints '
                         f"'Writing to DIR'), not in debug mode")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}, line {number}: not JSON ({e.msg})') from None
    return records


def configured_beta(run_dir: Path) -> Optional[float]:
    """loss.beta of a preference run (any loss of the registry but SFT) from RUN_DIR/config.yaml, None for SFT or
    without a config."""
    path = Path(run_dir) / 'config.yaml'
    if not path.is_file():
        return None
    from omegaconf import OmegaConf
    from losses import LOSS_NAMES, SFT
    loss = OmegaConf.load(path).get('loss', {})
    return float(loss.beta) if loss.get('name') in LOSS_NAMES and loss.get('name') != SFT else None


def series(records: Sequence[Dict], split: str, key: str, x_offset: int = 0):
    """(x, y): examples seen (shifted by x_offset) and `key` over the `split` records that have it."""
    points = [(r['counters/examples'] + x_offset, r[key]) for r in records if r.get('split') == split and key in r]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean over up to `window` values (the first values average over fewer)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_train_and_eval(ax, curves: Sequence[Curve], key: str, smooth: int = 20) -> bool:
    """Train values (faint, and their moving average) and eval values (dots and line) of `key`, in which
    '*' stands for the split ('rewards_*/margins'); whether anything was drawn."""
    drawn = False
    for curve in curves:
        x, y = series(curve.records, 'train', key.replace('*', 'train'), curve.x_offset)
        if y:
            ax.plot(x, y, color=curve.color, alpha=0.15, linewidth=0.8)
            ax.plot(x, moving_average(y, smooth), color=curve.color, linewidth=1.5, label=f'{curve.label} (train)')
            drawn = True
        x, y = series(curve.records, 'eval', key.replace('*', 'eval'), curve.x_offset)
        if y:
            ax.plot(x, y, color=curve.color, linestyle='--', marker='o', markersize=4, label=f'{curve.label} (eval)')
            drawn = True
    return drawn


def finish(fig, ax, title: str, ylabel: str, path: Path, xlabel: str = 'training examples') -> Path:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_and_eval_figure(curves: Sequence[Curve], pattern: str, title: str, ylabel: str, path: Path,
                               decorate: Callable = lambda ax: None) -> Optional[Path]:
    """One figure of the train and eval series matching `pattern` (None when no run logged it)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if not plot_train_and_eval(ax, curves, pattern):
        plt.close(fig)
        return None
    decorate(ax)
    return finish(fig, ax, title, ylabel, path)


def plot_loss(curves: Sequence[Curve], out: Path) -> Optional[Path]:
    return plot_train_and_eval_figure(curves, 'loss/*', 'Loss', 'loss', out / 'loss.png')


def plot_reward_margins(curves: Sequence[Curve], out: Path) -> Optional[Path]:
    """Two panels: the reward margin β0·m (the configured β0, also for β-DPO, as the original logs it) and m
    itself, the log-ratio margin (π_c − ref_c) − (π_r − ref_r), which compares runs of different β (runs from
    before it was logged: left only)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    if not plot_train_and_eval(left, curves, 'rewards_*/margins'):
        plt.close(fig)
        return None
    for ax, title in ((left, 'Reward margin: β0·log(π/π_ref) of chosen minus rejected'),
                      (right, 'Log-ratio margin (no β): log(π/π_ref) of chosen minus rejected')):
        ax.axhline(0, color='gray', linewidth=0.8)
        ax.set_title(title, fontsize=10)
    if not plot_train_and_eval(right, curves, 'rewards_*/logratio_margins'):
        right.set_axis_off()
    right.set_xlabel('training examples')
    right.grid(alpha=0.3)
    return finish(fig, left, left.get_title(), 'mean margin', out / 'reward_margins.png')


def plot_reward_accuracy(curves: Sequence[Curve], out: Path) -> Optional[Path]:
    return plot_train_and_eval_figure(curves, 'rewards_*/accuracies', 'Reward accuracy (chosen reward > rejected reward)',
                                      'fraction of pairs', out / 'reward_accuracy.png',
                                      decorate=lambda ax: ax.set_ylim(-0.02, 1.02))


def plot_gold_accuracy(curves: Sequence[Curve], out: Path, xlabel: str = 'training examples') -> Optional[Path]:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for curve in curves:
        x, y = series(curve.records, 'eval', 'gold_eval/accuracy', curve.x_offset)
        if y:
            ax.plot(x, y, color=curve.color, marker='o', markersize=4, label=curve.label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_ylim(-0.02, 1.02)
    return finish(fig, ax, 'Gold accuracy (greedy answers exactly right, held-out prompts)', 'fraction of prompts',
                  out / 'gold_accuracy.png', xlabel)


def plot_beta(curves: Sequence[Curve], out: Path, smooth: int = 10) -> Optional[Path]:
    """β used per step (β-DPO) or the fixed β (DPO), above the fraction of each batch the filter kept."""
    dynamic = [c for c in curves if series(c.records, 'train', 'record_train/beta_used')[1]]
    if not dynamic:
        return None
    fig, (ax_beta, ax_kept) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for curve in curves:
        x, beta = series(curve.records, 'train', 'record_train/beta_used', curve.x_offset)
        if beta:
            ax_beta.plot(x, beta, color=curve.color, alpha=0.2, linewidth=0.8)
            ax_beta.plot(x, moving_average(beta, smooth), color=curve.color, label=f'{curve.label}: β used')
            xk, kept = series(curve.records, 'train', 'record_train/kept_fraction', curve.x_offset)
            ax_kept.plot(xk, kept, color=curve.color, label=f'{curve.label}: kept fraction')
        elif curve.beta is not None:
            x, _ = series(curve.records, 'train', 'loss/train', curve.x_offset)
            if x:
                ax_beta.plot([min(x), max(x)], [curve.beta] * 2, color=curve.color, linestyle='--',
                             label=f'{curve.label}: fixed β')
                ax_kept.plot([min(x), max(x)], [1.0] * 2, color=curve.color, linestyle='--',
                             label=f'{curve.label}: all pairs')
    ax_beta.set_title('β-DPO: batch-level β (moving average and per step)')
    ax_beta.set_ylabel('β')
    ax_beta.grid(alpha=0.3)
    ax_beta.legend(fontsize=8)
    ax_kept.set_ylim(0, 1.05)
    ax_kept.set_ylabel('fraction of batch kept')
    return finish(fig, ax_kept, 'β-guided filter: pairs kept per batch', 'fraction of batch kept', out / 'beta.png')


def plot_curves(curves: Sequence[Curve], out: Path, gold_xlabel: str = 'training examples') -> List[Path]:
    """Every figure some curve has data for, written into `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_loss(curves, out), plot_reward_margins(curves, out), plot_reward_accuracy(curves, out),
               plot_gold_accuracy(curves, out, gold_xlabel), plot_beta(curves, out)]
    return [p for p in written if p is not None]


def curves_of_runs(run_dirs: Sequence[Path], labels: Optional[Sequence[str]] = None) -> List[Curve]:
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'--labels: {len(labels)} labels for {len(run_dirs)} run directories')
    return [Curve(label, read_metrics(d), COLORS[i % len(COLORS)], beta=configured_beta(d))
            for i, (d, label) in enumerate(zip(run_dirs, labels))]
