"""Figures of any run directory train.py wrote, from its metrics.jsonl (the functions are in plots.py).

    python scripts/plot_run.py RUN_DIR                      # PNGs into RUN_DIR/plots/
    python scripts/plot_run.py RUN_DIR --out DIR            # ... into DIR
    python scripts/plot_run.py DPO_RUN BETA_RUN --labels DPO β-DPO --out DIR     # several runs on the same axes

RUN_DIR is the directory train.py announces ('Writing to DIR'). Each figure is written only if some run logged its
metrics: loss.png (train and eval), reward_margins.png, reward_accuracy.png, gold_accuracy.png
(datasets=[synthetic]), beta.png (β-DPO's β used and kept fraction; plain DPO runs show their fixed β).
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for `python scripts/plot_run.py`

from plots import curves_of_runs, plot_curves  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('run_dirs', nargs='+', type=Path, help="run directories (each holds metrics.jsonl)")
    parser.add_argument('--out', type=Path, default=None, help='output folder (default: FIRST_RUN_DIR/plots)')
    parser.add_argument('--labels', nargs='+', default=None, help='legend label of each run (default: folder names)')
    args = parser.parse_args(argv)
    try:
        curves = curves_of_runs(args.run_dirs, args.labels)
    except ValueError as e:
        parser.error(str(e))
    written = plot_curves(curves, args.out or args.run_dirs[0] / 'plots')
    for path in written:
        print(path)
    if not written:
        print('nothing to plot: the runs logged no metrics yet')


if __name__ == '__main__':
    main()
