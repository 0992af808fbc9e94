"""Evaluate a policy as the papers do: sample at several temperatures, judge the samples, and estimate KL(π‖π_ref).

    # the embedded default run, greedy and sampled, scored by the synthetic task's checker (gold_eval/accuracy)
    python evaluate.py model=RUN_DIR out=eval_run

    # the β-DPO paper's HH protocol: win rate against the data set's chosen responses across temperatures,
    # judged in both orders by a local chat model (or api:gpt-4 with OPENAI_API_KEY set), KL against the SFT run
    python evaluate.py model=DPO_RUN_DIR datasets=[hh] judge=llm:/path/to/chat_model \
        temperatures=[0,0.25,0.5,0.75,1.0] n_prompts=256 reference=SFT_RUN_DIR out=eval_dpo

    # a reward model or the VADER sentiment score as the judge; reward against KL as in the DPO paper's Fig. 2
    python evaluate.py model=RUN_DIR datasets=[data/prompts.jsonl] judge=sentiment reference=SFT_RUN_DIR \
        n_samples=4 out=eval_sentiment

Writes OUT/results.json (per temperature: a pairwise judge's win rate with its 95% confidence interval and n, or a
scorer's mean with its standard error; with a reference the mean sequence-level KL estimate), OUT/samples.jsonl
(every sample with its score or verdicts and log-probabilities) and the plots OUT/*_vs_temperature.png and, with
a reference, OUT/*_vs_kl.png. Every option is in config/evaluate/evaluate.yaml. A bad input (an unknown judge, an
unreachable endpoint, a directory that is no model, a data source without prompts) stops with a message before
anything is generated.

The KL estimate: for samples y ~ π(·|x), KL(π‖π_ref) = E[log π(y|x) − log π_ref(y|x)], with both log-probabilities
summed over the generated tokens (the stop token included) at temperature 1. Its sample mean is unbiased for
samples drawn at temperature 1 (top_p 1); at another temperature it is the same expectation under the tempered
sampling distribution, the policy's KL as actually deployed at that temperature.
"""
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import hydra
from omegaconf import DictConfig, OmegaConf

from generation import (Prompt, encode_prompts, generate, load_model, load_prompts, load_tokenizer_of, model_kind,
                        response_text, sample_rows, sequence_logps, write_jsonl)
from judges import GoldScorer, judge_problems, make_judge
from utils import get_local_dir

# two-sided 95% quantile of the standard normal distribution
Z95 = 1.959964


def validate_config(config: DictConfig) -> List[str]:
    """Every problem with `config` that can be found without loading anything, as messages naming the key."""
    problems = []
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        problems.append(f'missing values for: {", ".join(missing)} (set them on the command line, e.g. {missing[0]}=...)')
    for key in ('model', 'reference'):
        value = config.get(key) if key not in missing else None
        if value is not None:
            try:
                model_kind(str(value))
            except ValueError as e:
                problems.append(f'{key}={e}')
    problems += judge_problems(config.judge)
    datasets = config.datasets
    if not datasets or isinstance(datasets, str):
        problems.append(f'datasets={datasets!r} must be a non-empty list, e.g. datasets=[hh]')
    temperatures = config.temperatures
    if not temperatures or isinstance(temperatures, str) or not all(is_number(t) and t >= 0 for t in temperatures):
        problems.append(f'temperatures={temperatures!r} must be a non-empty list of numbers >= 0, e.g. [0,0.5,1.0]')
    if config.split not in ('train', 'test'):
        problems.append(f'split={config.split!r} must be train or test')
    if config.n_prompts is not None and not positive_int(config.n_prompts):
        problems.append(f'n_prompts={config.n_prompts!r} must be a positive integer or null (all)')
    for key in ('n_samples', 'max_new_tokens', 'max_prompt_length', 'batch_size', 'judge_max_new_tokens',
                'judge_batch_size', 'api_concurrency'):
        if not positive_int(config[key]):
            problems.append(f'{key}={config[key]!r} must be a positive integer')
    if not (is_number(config.top_p) and 0 < config.top_p <= 1):
        problems.append(f'top_p={config.top_p!r} must be in (0, 1]')
    if config.dtype not in ('float32', 'bfloat16', 'float16'):
        problems.append(f'dtype={config.dtype!r} must be float32, bfloat16 or float16')
    if config.judge == 'gold' and datasets and list(datasets) != ['synthetic']:
        problems.append(f'judge=gold checks the synthetic task only; use datasets=[synthetic] (got {list(datasets)})')
    return problems


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def dataset_options(config: DictConfig) -> Dict:
    """Options of the data loaders: evaluate.yaml's `synthetic:`, else the run's own, else the defaults; and the
    run's render_hh_with_chat_template, so its prompts are rendered as in training."""
    run_config = Path(str(config.model)).expanduser() / 'config.yaml'
    run = OmegaConf.load(run_config) if model_kind(str(config.model)) == 'run' else None
    options = {'render_hh_with_chat_template': True} if run is not None and run.get('render_hh_with_chat_template') else {}
    if config.synthetic is not None:
        options['synthetic'] = OmegaConf.to_container(config.synthetic, resolve=True)
    elif run is not None and 'synthetic' in run:
        options['synthetic'] = {**OmegaConf.to_container(run.synthetic, resolve=True), 'train_pairs': None}
    return options


def mean_and_stderr(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """{'mean', 'stderr', 'n'}: the sample mean and its standard error s/√n (s with n − 1; None for n < 2)."""
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return {'mean': mean, 'stderr': None, 'n': n}
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {'mean': mean, 'stderr': math.sqrt(variance / n), 'n': n}


def win_rate_summary(scores: Sequence[float]) -> Dict:
    """{'win_rate', 'ci95', 'n'}: the mean pair score and its normal-approximation 95% interval, mean ± 1.96 s/√n,
    clipped to [0, 1] (the scores are 0, ¼, ½, ¾ or 1, so no binomial interval applies exactly; the samples of one
    prompt count as independent)."""
    stats = mean_and_stderr(scores)
    if stats['stderr'] is None:
        return {'win_rate': stats['mean'], 'ci95': None, 'n': stats['n']}
    half = Z95 * stats['stderr']
    return {'win_rate': stats['mean'], 'ci95': [max(0.0, stats['mean'] - half), min(1.0, stats['mean'] + half)],
            'n': stats['n']}


def judge_samples(judge, prompts: Sequence[Prompt], references: Sequence[str], rows: List[Dict]) -> Dict:
    """Judge every sample row (adding its score or verdicts to the row); the temperature's summary. The judge reads
    each prompt's dialogue (Prompt.dialogue), not the policy's chat-rendered text."""
    judged = [prompts[r['prompt_index']] for r in rows]
    completions = [r['completion'] for r in rows]
    if judge.pairwise:
        comparisons = judge.compare(judged, completions, [references[r['prompt_index']] for r in rows])
        for row, c in zip(rows, comparisons):
            row.update(win=c.score, verdict_response_first=c.verdict_response_first,
                       verdict_response_second=c.verdict_response_second)
        unparsed = sum((c.verdict_response_first is None) + (c.verdict_response_second is None) for c in comparisons)
        return {**win_rate_summary([c.score for c in comparisons]), 'unparsed_verdicts': unparsed}
    scores = judge.score(judged, completions)
    for row, s in zip(rows, scores):
        row['score'] = s
    stats = mean_and_stderr(scores)
    return {'mean_score': stats['mean'], 'stderr': stats['stderr'], 'n': stats['n']}


def add_kl(policy, reference, prompt_ids: Sequence[Sequence[int]], samples, rows: List[Dict], batch_size: int) -> Dict:
    """log π and log π_ref of every sample (added to its row) and the mean sequence-level KL estimate."""
    flat = [s for row in samples for s in row]
    ids = [prompt_ids[s.prompt_index] for s in flat]
    completions = [s.completion_ids for s in flat]
    policy_logps = sequence_logps(policy, ids, completions, batch_size)
    reference_logps = sequence_logps(reference, ids, completions, batch_size)
    for row, lp, lr in zip(rows, policy_logps, reference_logps):
        row.update(logp_policy=lp, logp_reference=lr, kl=lp - lr)
    stats = mean_and_stderr([lp - lr for lp, lr in zip(policy_logps, reference_logps)])
    return {'mean': stats['mean'], 'stderr': stats['stderr']}


def evaluate_temperature(config: DictConfig, temperature: float, policy, reference, judge, prompts: Sequence[Prompt],
                         references: Sequence[str], prompt_ids) -> Tuple[Dict, List[Dict]]:
    """(summary, sample rows) of one temperature: sample, judge, estimate KL."""
    start = time.time()
    n = config.n_samples if temperature > 0 else 1
    samples = generate(policy, prompt_ids, n, temperature, config.top_p, config.max_new_tokens, config.seed,
                       config.batch_size)
    rows = sample_rows(prompts, samples, temperature=temperature)
    summary = {'temperature': temperature, **judge_samples(judge, prompts, references, rows)}
    if reference is not None:
        summary['kl'] = add_kl(policy, reference, prompt_ids, samples, rows, config.batch_size)
    summary['mean_new_tokens'] = sum(r['n_tokens'] for r in rows) / len(rows)
    summary['stopped_fraction'] = sum(r['stopped'] for r in rows) / len(rows)
    summary['seconds'] = round(time.time() - start, 1)
    return summary, rows


def plot_results(results: Dict, out: Path) -> List[Path]:
    """The judge's measure against temperature (with its 95% interval or ±1 standard error) and, with a reference,
    against the mean KL; returns the files written."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    pairwise = results['pairwise']
    rows = results['temperatures']
    name, label = ('win_rate', 'win rate against chosen') if pairwise else ('score', f'mean score ({results["judge"]})')
    values = [r['win_rate'] if pairwise else r['mean_score'] for r in rows]
    if pairwise:
        errors = [[v - r['ci95'][0] if r['ci95'] else 0 for v, r in zip(values, rows)],
                  [r['ci95'][1] - v if r['ci95'] else 0 for v, r in zip(values, rows)]]
    else:
        errors = [r['stderr'] or 0 for r in rows]
    written = []
    x_axes = [('temperature', [r['temperature'] for r in rows], 'sampling temperature')]
    if all(r.get('kl') for r in rows):
        x_axes.append(('kl', [r['kl']['mean'] for r in rows], 'KL(π‖π_ref), nats per sequence'))
    for x_name, xs, x_label in x_axes:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.errorbar(xs, values, yerr=errors, marker='o', capsize=3)
        if x_name == 'kl':
            for x, y, r in zip(xs, values, rows):
                ax.annotate(f'T={r["temperature"]:g}', (x, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
        if pairwise:
            ax.axhline(0.5, color='gray', linewidth=0.8, linestyle='--')
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.set_title(Path(str(results['model'])).name or str(results['model']), fontsize=9)
        fig.tight_layout()
        path = out / f'{name}_vs_{x_name}.png'
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def evaluate(config: DictConfig) -> Dict:
    """Validate, build the judge and the prompts (every bad input fails here), load the models, then evaluate each
    temperature and write results.json, samples.jsonl and the plots to config.out. Returns the results."""
    problems = validate_config(config)
    if problems:
        raise ValueError('invalid config:\n  - ' + '\n  - '.join(problems))
    local_dirs = list(config.local_dirs)
    judge = make_judge(config.judge, config.judge_max_new_tokens, config.judge_batch_size, config.api_concurrency,
                       config.device)
    tokenizer = load_tokenizer_of(str(config.model), local_dirs)
    prompts = load_prompts(list(config.datasets), config.split, config.n_prompts, tokenizer,
                           get_local_dir(local_dirs), dataset_options(config))
    if isinstance(judge, GoldScorer):
        judge.check_prompts([p.text for p in prompts])
    policy = load_model(str(config.model), config.device, config.dtype, local_dirs)
    reference = load_model(str(config.reference), config.device, config.dtype, local_dirs) if config.reference else None
    references = [response_text(policy, p) for p in prompts]
    prompt_ids = encode_prompts(policy.tokenizer, prompts, config.max_prompt_length)

    out = Path(str(config.out))
    out.mkdir(parents=True, exist_ok=True)
    results = {'model': str(config.model), 'reference': config.reference, 'judge': str(config.judge),
               'pairwise': judge.pairwise, 'datasets': list(config.datasets), 'split': config.split,
               'n_prompts': len(prompts), 'n_samples': config.n_samples, 'top_p': config.top_p,
               'max_new_tokens': config.max_new_tokens, 'seed': config.seed, 'temperatures': []}
    if not judge.pairwise:
        results['chosen'] = mean_and_stderr(judge.score(prompts, references))
    all_rows = []
    for temperature in config.temperatures:
        summary, rows = evaluate_temperature(config, float(temperature), policy, reference, judge, prompts,
                                             references, prompt_ids)
        results['temperatures'].append(summary)
        all_rows += rows
        print(describe(summary))
    write_jsonl(out / 'samples.jsonl', all_rows)
    (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
    plots = plot_results(results, out)
    print(f'wrote {out / "results.json"}, {out / "samples.jsonl"}, {", ".join(p.name for p in plots)}')
    return results


def describe(summary: Dict) -> str:
    """'T=0.5: win rate 0.531 [0.468, 0.594] (n=256), KL 3.2 nats' or 'T=0: mean score 0.25 ± 0.04 (n=16)'."""
    if 'win_rate' in summary:
        ci = summary['ci95']
        text = f'win rate {summary["win_rate"]:.3f}' + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')
    else:
        se = summary['stderr']
        text = f'mean score {summary["mean_score"]:.4g}' + (f' ± {se:.2g}' if se is not None else '')
    text = f'T={summary["temperature"]:g}: {text} (n={summary["n"]})'
    if summary.get('kl'):
        text += f', KL {summary["kl"]["mean"]:.3g} nats'
    return text


@hydra.main(version_base=None, config_path='config/evaluate', config_name='evaluate')
def main(config: DictConfig) -> None:
    evaluate(config)


if __name__ == '__main__':
    main()
