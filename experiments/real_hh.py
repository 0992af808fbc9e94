"""SmolLM2-135M-Instruct on the real HH harmless slice: SFT, then DPO and β-DPO (ρ = 0.2, α = 0.6), full fine-tuning and
LoRA, with held-out reward accuracy and margins before and after (README, "Real runs on HH").

    python experiments/real_hh.py                         # 128 training pairs, 64 held out; report in real_hh_report/
    python experiments/real_hh.py --n-train 512 --max-length 256 --parallel 1 --threads 2

The slice (../shared/data/hh-rlhf/harmless-base-test.jsonl.gz, 2,312 rows of Anthropic/hh-rlhf's harmless-base test
split, byte-identical) is split by prompt: a row is held out when the SHA-256 of its prompt (the dialogue up to its
last "\\n\\nAssistant:") is 0 mod 10, so no prompt is on both sides. The rows go unchanged into OUT/data/train.jsonl.gz
and test.jsonl.gz, the upstream schema, which train.py reads as `datasets=[hh:OUT/data]`, exactly as it reads the Hub
data set. Every stage is an ordinary train.py command (listed in the report with its time), offline, on the GGUF
copy of `make smollm2` converted once to float32:

1. SFT of the whole model on the chosen responses of the training pairs (dialogues rendered through the model's chat
   template, `render_hh_with_chat_template=true`);
2. from its archive, side by side: DPO and β-DPO of the whole model, and DPO and β-DPO with LoRA (r = 16, α = 32, every
   projection of the blocks); the reference is the SFT model, its log-probabilities precomputed.

Each run evaluates the held-out pairs before its first step and after its last. A preference run starts with policy =
reference, so its held-out margins start at 0 and its reward accuracy (the share of pairs with a positive margin) at
0; what the table shows is where the runs end, and how the log-probabilities of the chosen and rejected responses
moved. The SFT row shows the held-out log-likelihood of the chosen responses.

The console shows each run's command and log file (OUT/logs/NAME.log) as it starts, a progress bar per running run
(where stderr is a terminal) and its time and run directory as it ends, then the report and, last, its path.
"""
import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import report, stages  # noqa: E402
from experiments.demo_real import SMOLLM2, run_dir_of  # noqa: E402
from experiments.stages import Finished, Job, run_jobs  # noqa: E402

HH_SLICE = REPO.parent / 'shared' / 'data' / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'
ASSISTANT = '\n\nAssistant:'
BETA_DPO = {'loss.mode_loss': 'beta_DPO', 'loss.mode_weight': '0.2', 'loss.a': '0.6'}
# (name, label, overrides) of the preference runs; all start from the SFT run's archive
RUNS = (
    ('dpo_full', 'DPO, full', {}),
    ('beta_dpo_full', 'β-DPO, full', BETA_DPO),
    ('dpo_lora', 'DPO, LoRA r = 16', {'lora.r': '16', 'lora.alpha': '32'}),
    ('beta_dpo_lora', 'β-DPO, LoRA r = 16', {'lora.r': '16', 'lora.alpha': '32', **BETA_DPO}),
)
EVAL_KEYS = (('rewards_eval/accuracies', 'reward accuracy', '{:.3f}'), ('rewards_eval/margins', 'reward margin', '{:+.3f}'),
             ('logps_eval/chosen', 'log p(chosen)', '{:.1f}'), ('logps_eval/rejected', 'log p(rejected)', '{:.1f}'),
             ('loss/eval', 'loss', '{:.4f}'))


def prompt_of(dialogue: str) -> str:
    """An HH dialogue's prompt: everything up to and including its last '\\n\\nAssistant:'."""
    return dialogue[:dialogue.rfind(ASSISTANT) + len(ASSISTANT)]


def held_out(prompt: str) -> bool:
    """A tenth of the prompts, chosen by the prompt's text alone (the same on every machine and for every order)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], 'big') % 10 == 0


def split_by_prompt(source: Path, out: Path) -> Dict[str, int]:
    """OUT/train.jsonl.gz and OUT/test.jsonl.gz: the rows of `source` unchanged, divided by prompt; rows per split."""
    lines = gzip.open(source, 'rt', encoding='utf-8').read().splitlines()
    splits: Dict[str, List[str]] = {'train': [], 'test': []}
    for line in lines:
        splits['test' if held_out(prompt_of(json.loads(line)['chosen'])) else 'train'].append(line)
    prompts = {split: {prompt_of(json.loads(line)['chosen']) for line in rows} for split, rows in splits.items()}
    assert not prompts['train'] & prompts['test'], 'a prompt on both sides of the split'
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with gzip.open(out / f'{split}.jsonl.gz', 'wt', encoding='utf-8') as f:
            f.write(''.join(row + '\n' for row in rows))
    return {split: len(rows) for split, rows in splits.items()}


def common_overrides(args, data: Path) -> Dict[str, str]:
    return {
        'model': 'smollm2', 'datasets': f'[hh:{data}]', 'render_hh_with_chat_template': 'true',
        'n_examples': str(args.n_train), 'n_eval_examples': str(args.n_test), 'batch_size': '8', 'eval_batch_size': '16',
        'max_length': str(args.max_length), 'max_prompt_length': str(args.max_length // 2),
        'optimizer': 'AdamW', 'warmup_steps': '2', 'seed': str(args.seed),
        # an evaluation before the first step (do_first_eval) and one after the last, nothing between
        'eval_every': '1_000_000', 'sample_during_eval': 'false', 'minimum_log_interval_secs': '0',
        'local_dirs': f'[{args.local_dir.resolve()}]', 'wandb.enabled': 'false'}


# every job is a train.py run of n_examples: its bar counts them (the log has the total), its console line ends with
# its run directory
TRAIN_JOB = dict(meter=lambda done: stages.TRAINING, outcome=lambda finished: f'run directory {run_dir_of(finished)}')


def plan(args, data: Path) -> List[Job]:
    base = common_overrides(args, data)
    sft = {**base, 'loss': 'sft', 'lr': args.full_lr, 'exp_name': 'hh_sft'}
    jobs = [Job('sft', lambda done: stages.python_command('train.py', *(f'{k}={v}' for k, v in sft.items())),
                **TRAIN_JOB)]
    for name, _, overrides in RUNS:
        lr = args.lora_lr if 'lora.r' in overrides else args.full_lr
        run = {**base, 'loss': 'dpo', 'loss.beta': '0.1', 'precompute_ref_log_probs': 'true', 'lr': lr,
               'exp_name': f'hh_{name}', **overrides}
        jobs.append(Job(name, lambda done, run=run: stages.python_command(
            'train.py', *(f'{k}={v}' for k, v in run.items()),
            f'model.archive={run_dir_of(done["sft"]) / "LATEST" / "policy.pt"}'), after=('sft',), **TRAIN_JOB))
    return jobs


def summary(finished: Finished) -> dict:
    """The first and last evaluation of a run, β-DPO's mean β and kept fraction, its time and command."""
    metrics = report.run_metrics(run_dir_of(finished))
    return {'before': metrics.evals[0], 'after': metrics.evals[-1], 'steps': metrics.steps, 'wall_s': finished.wall_s,
            'beta_mean': metrics.beta_mean, 'kept_mean': metrics.kept_mean, 'run_dir': str(run_dir_of(finished)),
            'command': stages.typed(finished.command)}


def cell(values: dict, key: str, fmt: str) -> str:
    before, after = values['before'].get(key), values['after'].get(key)
    return '' if after is None else f'{fmt.format(before)} → {fmt.format(after)}'


def write_report(args, rows_per_split: Dict[str, int], results: Dict[str, dict], out: Path, total_s: float) -> Path:
    labels = {'sft': 'SFT, full', **{name: label for name, label, _ in RUNS}}
    rows = [[labels[name], str(values['steps']), *(cell(values, key, fmt) for key, _, fmt in EVAL_KEYS),
             '' if values['beta_mean'] is None else f'{values["beta_mean"]:.3f}',
             '' if values['kept_mean'] is None else f'{values["kept_mean"]:.2f}', f'{values["wall_s"]:.0f}']
            for name, values in results.items()]
    lines = ['# SmolLM2-135M-Instruct on HH harmless: SFT, DPO and β-DPO, full and LoRA', '',
             report.header_line('experiments/real_hh.py', [f'{args.threads} torch thread(s) per run',
                                                           f'{args.parallel} run(s) at a time'], total_s), '',
             f'Data: {HH_SLICE.name} split by prompt, {rows_per_split["train"]} training and {rows_per_split["test"]} '
             f'held-out rows; each run trains on the first {args.n_train} of its shuffled training stream (batch 8, '
             f'one pass) and evaluates on {args.n_test} held-out pairs, prompt ≤ {args.max_length // 2} and pair ≤ '
             f'{args.max_length} tokens (chat template). lr {args.full_lr} (full) and {args.lora_lr} (LoRA), AdamW, '
             'β = 0.1; β-DPO ρ = 0.2, α = 0.6. Values are the held-out evaluation before the first step → after the '
             'last; log-probabilities are per response, summed over its tokens.', '',
             report.markdown_table(['run', 'steps', *(title for _, title, _ in EVAL_KEYS), 'β used (mean)', 'kept',
                                    'time (s)'], rows), '',
             *report.commands_section('Commands', [f'python experiments/real_hh.py --split-only --out {out}  # the data',
                                                   *(values['command'] for values in results.values())]),
             *report.run_dirs_section([(labels[name], values['run_dir']) for name, values in results.items()])]
    return report.write_report(out, lines, results)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--hh', type=Path, default=HH_SLICE, help='the HH file to split (default: the shared slice)')
    parser.add_argument('--out', type=Path, default=REPO / 'real_hh_report', help='output folder')
    parser.add_argument('--local-dir', type=Path, default=REPO / '.cache',
                        help="train.py's local_dirs: the converted model, the caches, the run directories")
    parser.add_argument('--n-train', type=int, default=128, help='training pairs (n_examples)')
    parser.add_argument('--n-test', type=int, default=64, help='held-out pairs evaluated (n_eval_examples)')
    parser.add_argument('--max-length', type=int, default=128, help='tokens of a prompt + response (prompt: half)')
    parser.add_argument('--full-lr', default='1e-5', help='learning rate of full fine-tuning (SFT, DPO, β-DPO)')
    parser.add_argument('--lora-lr', default='5e-4', help='learning rate of the LoRA runs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--parallel', type=int, default=2, help='runs at a time (each full run holds ~3-6 GB)')
    parser.add_argument('--split-only', action='store_true', help='write OUT/data and stop')
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test, args.threads, args.parallel) < 1 or args.max_length < 16:
        parser.error('--n-train, --n-test, --threads and --parallel must be positive, --max-length at least 16')
    if not args.hh.is_file():
        parser.error(f'--hh {args.hh}: no such file (the shared HH slice lives in ../shared/data/hh-rlhf/)')
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    os.environ['HF_HUB_OFFLINE'] = '1'  # the GGUF copy of `make smollm2`, as every run here uses
    start = time.time()
    rows_per_split = split_by_prompt(args.hh, out / 'data')
    print(f'{args.hh}: {rows_per_split["train"]} training and {rows_per_split["test"]} held-out rows, split by prompt')
    if args.split_only:
        return
    try:
        from models import materialize_model
        from utils import get_local_dir
        # converted once here, before the runs start side by side
        materialize_model(SMOLLM2, get_local_dir([str(args.local_dir.resolve())]))
        done = run_jobs(plan(args, out / 'data'), out, args.parallel, args.threads)
    except (RuntimeError, ValueError) as e:
        sys.exit(f'real_hh.py: {e}')
    results = {name: summary(done[name]) for name in ['sft', *(name for name, _, _ in RUNS)]}
    path = write_report(args, rows_per_split, results, out, time.time() - start)
    print(f'\n{path.read_text()}\nReport: {path}')


if __name__ == '__main__':
    main()
