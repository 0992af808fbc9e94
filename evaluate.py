"""Evaluate a policy as the papers do: sample at several temperatures, judge the samples, and estimate KL(π_T‖π_ref).

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
scorer's mean with its standard error, and how many verdicts a pairwise judge left unparsed; with a reference the
mean sequence-level KL(π_T‖π_ref) estimate and what it is, kl_definition), OUT/samples.jsonl
(every sample with its score or verdicts and log-probabilities) and the plots OUT/*_vs_temperature.png and, with
a reference, OUT/*_vs_kl.png. Every option is in config/evaluate/evaluate.yaml. A bad input (an unknown judge, an
unreachable endpoint, a directory that is no model, a data source without prompts) stops with a message before
anything is generated.

The KL estimate is of KL(π_T‖π_ref), the KL of the policy as sampled at each temperature: samples y ~ π_T(·|x)
drawn at temperature T (renormalised over the top_p nucleus) are scored with that same distribution, and
KL(π_T‖π_ref) = E_{y~π_T}[log π_T(y|x) − log π_ref(y|x)], both log-probabilities summed over the generated tokens (the
stop token included), π_ref at temperature 1. The sample mean is unbiased at every T; at T = 1, top_p = 1 it is the
usual KL(π‖π_ref) (the DPO paper's Fig. 2), and at T = 0 (greedy decoding: a point mass, log π_0 = 0) it is
−log π_ref of the greedy answer. (Scoring tempered samples with temperature-1 log-probabilities, as this file did
before, estimates neither KL: it is exactly 0 at every T for a policy that is its own reference.) Each sample's
log π, log π_T and log π_ref are in samples.jsonl (logp_policy, logp_sampling, logp_reference). Only temperature and
top_p shape the samples: a model's own generation config (top_k, repetition_penalty...) is switched off
(generation.sampling_kwargs), so that the distribution scored is the one sampled.
"""
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import hydra
from omegaconf import DictConfig, OmegaConf

from config_schema import EVALUATE_SCHEMA, missing_problems, table_problems
from generation import (Prompt, encode_prompts, generate, load_model, load_prompts, load_tokenizer_of, model_kind,
                        response_text, trained_chat_rendering, sample_rows, sequence_logps, sequence_logps_per_rule, write_jsonl)
from judges import GoldScorer, judge_problems, make_judge
from utils import UserError, exits_on_user_error, get_local_dir

# two-sided 95% quantile of the standard normal distribution
Z95 = 1.959964


def validate_config(config: DictConfig) -> List[str]:
    """Every problem with `config` that can be found without loading anything, as messages naming the key: the
    models, the judge, then each key's rule (config_schema.EVALUATE_SCHEMA, the mechanism train.py's config uses)."""
    missing = sorted(OmegaConf.missing_keys(config))
    problems = missing_problems(config)
    for key in ('model', 'reference'):
        value = config.get(key) if key not in missing else None
        if value is not None:
            try:
                model_kind(str(value))
            except ValueError as e:
                problems.append(f'{key}={e}')
    problems += judge_problems(config.judge)
    problems += table_problems(config, EVALUATE_SCHEMA, skip=missing)
    datasets = config.datasets
    if config.judge == 'gold' and datasets and list(datasets) != ['synthetic']:
        problems.append(f'judge=gold checks the synthetic task only; use datasets=[synthetic] (got {list(datasets)})')
    return problems


def dataset_options(config: DictConfig) -> Dict:
    """Options of the data loaders: evaluate.yaml's `synthetic:`, else the run's own, else the defaults; and
    render_hh_with_chat_template: evaluate.yaml's when set, else the model's own (a run's config.yaml, or what its
    hf_model/ carries: generation.trained_chat_rendering), else false, so the prompts are rendered as in training."""
    run_config = Path(str(config.model)).expanduser() / 'config.yaml'
    run = OmegaConf.load(run_config) if model_kind(str(config.model)) == 'run' else None
    render = config.render_hh_with_chat_template
    if render is None:
        render = trained_chat_rendering(str(config.model))
    options = {'render_hh_with_chat_template': True} if render else {}
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


def pairwise_summary(comparisons: Sequence) -> Dict:
    """win_rate_summary of the pairs' scores, with 'unparsed_verdicts': how many of the 2n verdicts (both orders of
    each pair) the judge's text held none of. Without a single verdict there is no win rate (win_rate and ci95
    None): each pair would score ½ (judges.comparison), which says only that the judge never answered."""
    unparsed = sum((c.verdict_response_first is None) + (c.verdict_response_second is None) for c in comparisons)
    summary = {**win_rate_summary([c.score for c in comparisons]), 'unparsed_verdicts': unparsed}
    if unparsed == 2 * len(comparisons):
        summary.update(win_rate=None, ci95=None)
    return summary


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
        return pairwise_summary(comparisons)
    scores = judge.score(judged, completions)
    for row, s in zip(rows, scores):
        row['score'] = s
    stats = mean_and_stderr(scores)
    return {'mean_score': stats['mean'], 'stderr': stats['stderr'], 'n': stats['n']}


# What results.json's and the plots' KL is (the policy's samples are scored with the distribution they were drawn from)
KL_DEFINITION = ('KL(π_T‖π_ref) per sequence: samples drawn at temperature T (renormalised over top_p) scored with '
                 'that same distribution π_T, π_ref at temperature 1; at T = 1, top_p = 1 the usual KL(π‖π_ref); at '
                 'T = 0 (greedy, a point mass) −log π_ref of the greedy answer')


def add_kl(policy, reference, prompt_ids: Sequence[Sequence[int]], samples, rows: List[Dict], batch_size: int,
           temperature: float = 1.0, top_p: float = 1.0) -> Dict:
    """The mean sequence-level estimate of KL(π_T‖π_ref) over the samples (KL_DEFINITION), and per sample row
    logp_policy (log π, temperature 1), logp_sampling (log π_T: what it was drawn from), logp_reference and kl =
    logp_sampling − logp_reference. Each row's kl is an unbiased one-sample estimate; the mean is ≥ 0 in expectation,
    so a negative mean is Monte-Carlo noise (describe says so)."""
    flat = [s for row in samples for s in row]
    ids = [prompt_ids[s.prompt_index] for s in flat]
    completions = [s.completion_ids for s in flat]
    policy_logps, sampling_logps = sequence_logps_per_rule(policy, ids, completions, [(1.0, 1.0), (temperature, top_p)],
                                                           batch_size)
    reference_logps = sequence_logps(reference, ids, completions, batch_size)
    kls = [ls - lr for ls, lr in zip(sampling_logps, reference_logps)]
    for row, lp, ls, lr, kl in zip(rows, policy_logps, sampling_logps, reference_logps, kls):
        row.update(logp_policy=lp, logp_sampling=ls, logp_reference=lr, kl=kl)
    stats = mean_and_stderr(kls)
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
        summary['kl'] = add_kl(policy, reference, prompt_ids, samples, rows, config.batch_size, temperature,
                               config.top_p)
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
    rows = [r for r in rows if (r['win_rate'] if pairwise else r['mean_score']) is not None]  # no verdicts: no point
    values = [r['win_rate'] if pairwise else r['mean_score'] for r in rows]
    if not rows:
        return []
    if pairwise:
        errors = [[v - r['ci95'][0] if r['ci95'] else 0 for v, r in zip(values, rows)],
                  [r['ci95'][1] - v if r['ci95'] else 0 for v, r in zip(values, rows)]]
    else:
        errors = [r['stderr'] or 0 for r in rows]
    written = []
    x_axes = [('temperature', [r['temperature'] for r in rows], 'sampling temperature')]
    if all(r.get('kl') for r in rows):
        top_p = f', top_p {results["top_p"]:g}' if results['top_p'] < 1 else ''
        x_axes.append(('kl', [r['kl']['mean'] for r in rows], f'KL(π_T‖π_ref), nats per sequence (T as sampled{top_p})'))
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
        raise UserError('invalid config:\n  - ' + '\n  - '.join(problems))
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
               'max_new_tokens': config.max_new_tokens, 'seed': config.seed,
               **({'kl_definition': KL_DEFINITION} if reference is not None else {}), 'temperatures': []}
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
    """'T=0.5: win rate 0.531 [0.468, 0.594] (n=256, 3 of 512 verdicts unparsed), KL(π_T‖π_ref) 3.2 ± 0.1 nats',
    'T=1: no verdicts (all 8 verdicts of 4 pairs unparsed): no win rate', or 'T=0: mean score 0.25 ± 0.04 (n=16)'."""
    if 'win_rate' in summary and summary['win_rate'] is None:
        text = (f'no verdicts (all {summary["unparsed_verdicts"]} verdicts of {summary["n"]} pairs unparsed): '
                f'no win rate')
    elif 'win_rate' in summary:
        ci = summary['ci95']
        text = (f'win rate {summary["win_rate"]:.3f}' + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')
                + f' (n={summary["n"]}, {summary["unparsed_verdicts"]} of {2 * summary["n"]} verdicts unparsed)')
    else:
        se = summary['stderr']
        text = f'mean score {summary["mean_score"]:.4g}' + (f' ± {se:.2g}' if se is not None else '') + \
            f' (n={summary["n"]})'
    text = f'T={summary["temperature"]:g}: {text}'
    if summary.get('kl'):
        text += ', ' + describe_kl(summary['kl'], summary['n'])
    return text


def describe_kl(kl: Dict, n: int) -> str:
    """'KL(π_T‖π_ref) 3.2 ± 0.1 nats', with a caveat when the estimate is negative: the KL itself is ≥ 0, so a
    negative mean of n one-sample estimates is Monte-Carlo noise (or a reference that is the policy itself)."""
    mean, se = kl['mean'], kl['stderr']
    text = f'KL(π_T‖π_ref) {mean:.3g}' + (f' ± {se:.2g}' if se is not None else '') + ' nats'
    if mean < 0:
        below = f', {-mean / se:.1f} standard errors below 0' if se else ''
        text += (f' (negative: Monte-Carlo noise of {n} samples{below}; the KL itself is ≥ 0, so read it as about 0 '
                 f'and draw more samples, n_prompts or n_samples, for a sharper estimate)')
    return text


@hydra.main(version_base=None, config_path='config/evaluate', config_name='evaluate')
@exits_on_user_error
def main(config: DictConfig) -> None:
    evaluate(config)


if __name__ == '__main__':
    main()
