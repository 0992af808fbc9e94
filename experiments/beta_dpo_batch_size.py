"""β-DPO's batch-size dependence on the embedded synthetic task (issue 26; ε-DPO's criticism of β-DPO, measured).

The same pairs (synthetic.n_train, one seed of the data) and the same number of examples at batch 8, 16, 32 and 64,
and batch 64 as 8 microbatches of 8 with loss.beta_dpo_scope=step (the optimizer step is the batch): per run the
spread (sd) of β-DPO's β over the training steps, the mean kept fraction, and the final gold accuracy; seeds 0-2.

    .venv/bin/python experiments/beta_dpo_batch_size.py --out /tmp/bs [--seeds 0 1 2] [--n-examples 2048]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ['wandb.enabled=false', 'sample_during_eval=false', 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO',
          'loss.mode_weight=0.2', 'loss.a=0.6', 'synthetic.n_train=1024', 'synthetic.n_test=64',
          'synthetic.n_gold_eval=32', 'n_eval_examples=64', 'eval_batch_size=16', 'warmup_steps=0',
          # every step's β logged: by default train.py logs at most once a second (minimum_log_interval_secs: 1.0),
          #   so which steps the sd saw, and the sd, depended on the machine's speed (seed 0, batch 8: 17 of the 64
          #   steps logged at one load, 26 at another)
          'minimum_log_interval_secs=0']
VARIANTS = {'batch8': ['batch_size=8'], 'batch16': ['batch_size=16'], 'batch32': ['batch_size=32'],
            'batch64': ['batch_size=64'],
            'batch64_step_scope_accum8': ['batch_size=64', 'gradient_accumulation_steps=8',
                                          'loss.beta_dpo_scope=step']}


def run(name, overrides, seed, n_examples, out):
    args = [*COMMON, *overrides, f'seed={seed}', f'n_examples={n_examples}', f'eval_every={n_examples}',
            f'local_dirs=[{out}]', f'exp_name={name}_s{seed}']
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=out, capture_output=True, text=True,
                            env={'WANDB_MODE': 'disabled', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1',
                                 'PATH': '/usr/bin:/bin'})
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    run_dir = next(Path(line[len('Writing to '):].strip()) for line in result.stdout.splitlines()
                   if line.startswith('Writing to '))
    records = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    betas = [r['record_train/beta_used'] for r in records if 'record_train/beta_used' in r]
    kept = [r['record_train/kept_fraction'] for r in records if 'record_train/kept_fraction' in r]
    gold = [r['gold_eval/accuracy'] for r in records if 'gold_eval/accuracy' in r]
    return {'variant': name, 'seed': seed, 'beta_sd': statistics.pstdev(betas) if betas else None,
            'beta_mean': statistics.mean(betas) if betas else None, 'beta_logged': len(betas),
            'kept_fraction': statistics.mean(kept) if kept else None, 'gold_accuracy': gold[-1] if gold else None,
            'wall_s': round(time.time() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--n-examples', type=int, default=2048)
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.variants:
            rows.append(run(name, VARIANTS[name], seed, args.n_examples, args.out))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / 'results.json').write_text(json.dumps(rows, indent=1) + '\n')


if __name__ == '__main__':
    main()
