"""On-policy preference pairs: a model's own samples, ranked by a judge (any data), or the synthetic task's gold
answer against the model's own mistakes.

    python scripts/sample_pairs.py RUN_DIR --out pairs.jsonl           # RUN_DIR: a run on datasets=[synthetic]
    python train.py loss=dpo loss.beta=0.5 datasets=[synthetic] synthetic.train_pairs=pairs.jsonl \\
        model.archive=RUN_DIR/LATEST/policy.pt ...

    # any prompts, any judge: 4 samples per prompt, the best against the worst (iterative, on-policy DPO)
    python scripts/sample_pairs.py SFT_RUN_DIR --judge reward:/path/to/reward_model --datasets hh --samples 4 --out pairs.jsonl
    python scripts/sample_pairs.py SFT_RUN_DIR --judge sentiment --datasets prompts.jsonl --pairs random --out pairs.jsonl
    # the β-DPO paper's mixture: half the pairs of low reward gap, 20% of the labels flipped
    python scripts/sample_pairs.py MODEL --judge sentiment --datasets sentiment_data --low-gap-fraction 0.5 --flip-fraction 0.2 ...
    python train.py loss=dpo loss.beta=0.1 datasets=[pairs.jsonl] model.archive=SFT_RUN_DIR/LATEST/policy.pt ...

With --judge (gold, sentiment, reward:PATH, llm:PATH, api:MODEL; see judges.py) the model (a run directory, a
Hugging Face directory, a .gguf file) answers the first --n-prompts prompts of --datasets (default: the run's own)
--samples times at --temperature. A scorer scores each sample; a pairwise judge compares every two samples of a
prompt in both orders and a sample's score is its number of wins. Each prompt gives one pair: with --pairs
best-worst (default) its best-scored sample against its worst, with --pairs random two samples drawn at random,
the better one chosen; a prompt whose two samples score the same (or are the same text) gives none.

The mixture of pair qualities the β-DPO paper studies (Wu et al. 2024, Sec. 3: pairs of low and high reward gap,
and flipped labels): with --low-gap-fraction F each prompt's pair is, with probability F, its two samples of
closest score (the smallest non-zero gap: a low-gap pair, "gap_kind": "low"), else its best against its worst (a
high-gap pair); --flip-fraction E swaps chosen and rejected of a fraction E of the pairs ("flipped": true, label
noise). The two draws come from generators of their own, one draw per prompt whether or not it gives a pair, so
the same seed with another E flips pairs of the same samples and changes nothing else. Rows are {"prompt",
"chosen", "rejected", "score_chosen", "score_rejected", "score_gap" (chosen minus rejected: negative when flipped),
"flipped", "dataset"} (and "gap_kind"), in the generic format train.py reads as datasets=[FILE] (prompts from a
chat template as message lists, so training renders them the same way).

Without --judge, on a run with datasets=[synthetic]:

The model of RUN_DIR (its config.yaml and LATEST/policy.pt) answers the task's training prompts once greedily
and `--samples` times at `--temperature`. Each prompt it gets wrong at least once gives one pair: the gold
answer (chosen) against its greedy answer if that is wrong, else against one of its wrong samples; prompts it
always answers right give none. A fraction `--flip-fraction` of the pairs is flipped (label noise, as in the
code-drawn pairs), and the rejected answers are whatever mistakes the model makes: near misses one edit away
(low reward gap) mixed with answers further off (high gap).

Why: the code-drawn pairs of datasets=[synthetic] contrast the gold answer with mistakes the SFT model rarely
makes, and DPO on them barely moved its greedy answers; preference training moves a model where its own samples
are pushed down ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data", Tajwar et al., ICML
2024). On these pairs DPO and β-DPO raise gold accuracy, though SFT continued on the gold answers raises it more
(README, "The demo"). Sampling is seeded: the same run directory and options give the same file.

Each row is {"prompt", "chosen", "rejected"} (the generic preference format, HH-style strings, responses with
their leading space) plus "greedy_correct" and "flipped" for inspection; the file is written atomically.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for `python scripts/sample_pairs.py`

from checkpoints import atomic_write_text  # noqa: E402
from synthetic_task import edit_distance, synthetic_gold_answer, synthetic_options, synthetic_prompts  # noqa: E402

# the longest gold answer is 13 bytes ('double' of 6 letters, with its leading space): room for a few more
MAX_NEW_TOKENS = 16


def load_run_policy(run_dir: Path):
    """(policy in eval mode, tokenizer, run config) of RUN_DIR's LATEST checkpoint."""
    from models import build_model, load_archive, load_tokenizer
    config_path = run_dir / 'config.yaml'
    if not config_path.is_file():
        raise FileNotFoundError(f'{run_dir}: no config.yaml; pass a run directory written by train.py')
    config = OmegaConf.load(config_path)
    if 'synthetic' not in config.datasets:
        raise ValueError(f'{run_dir} trained on datasets={list(config.datasets)}; on-policy pairs are made for '
                         f'the synthetic task with its gold answers (a run with datasets=[synthetic]), and for any '
                         f'other data with a judge: pass --judge sentiment, reward:PATH, llm:PATH or api:MODEL')
    policy = build_model(config, 'float32', None)
    checkpoint = run_dir / 'LATEST' / 'policy.pt'
    load_archive([policy], checkpoint, config.model.name_or_path)  # a LoRA run's adapters merged into its base
    if torch.cuda.is_available():
        policy.to('cuda')
    return policy.eval(), load_tokenizer(config), config


@torch.no_grad()
def answer(policy, tokenizer, prompts: Sequence[str], n: int, temperature: Optional[float]) -> List[List[str]]:
    """n answers per prompt (the text after the prompt, EOS and anything after it removed): greedy if
    temperature is None, else sampled at that temperature."""
    tokenizer.padding_side = 'left'
    inputs = tokenizer(list(prompts), return_tensors='pt', padding=True).to(policy.device)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    output = policy.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    texts = tokenizer.batch_decode(output[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def make_pair(prompt: str, greedy: str, samples: Sequence[str], rng: random.Random, flip_fraction: float) -> Optional[Dict]:
    """The row of one prompt (see the module docstring), or None when every answer is right."""
    gold = ' ' + synthetic_gold_answer(prompt)
    wrong = [s for s in samples if s.strip() != gold.strip()]
    greedy_correct = greedy.strip() == gold.strip()
    if greedy_correct and not wrong:
        return None
    rejected = greedy if not greedy_correct else rng.choice(wrong)
    flipped = rng.random() < flip_fraction
    chosen, rejected = (rejected, gold) if flipped else (gold, rejected)
    return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected, 'greedy_correct': greedy_correct,
            'flipped': flipped}


def describe(rows: Sequence[Dict], n_prompts: int) -> str:
    n = max(1, len(rows))
    near = sum(edit_distance(r['chosen'].strip(), r['rejected'].strip()) == 1 for r in rows)
    greedy_wrong = sum(not r['greedy_correct'] for r in rows)
    return (f'{len(rows)} pairs from {n_prompts} prompts (greedy answer wrong on {greedy_wrong}, '
            f'{100 * greedy_wrong / max(1, n_prompts):.1f}%); {100 * near / n:.1f}% near misses (one edit), '
            f'{100 * sum(r["flipped"] for r in rows) / n:.1f}% flipped')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('run_dir', help='a run directory of train.py (without --judge: one on datasets=[synthetic]); '
                                        'with --judge also a Hugging Face model directory or a .gguf file')
    parser.add_argument('--out', type=Path, required=True, help='the JSON lines file to write')
    parser.add_argument('--n-prompts', type=int, default=None,
                        help="prompts to answer (the first N of the split; default: all of them)")
    parser.add_argument('--samples', type=int, default=4,
                        help='sampled answers per prompt (without --judge: besides the greedy one)')
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--flip-fraction', type=float, default=None,
                        help="fraction of pairs flipped (default: with --judge 0, without it the run's "
                             "synthetic.flip_fraction)")
    parser.add_argument('--batch-size', type=int, default=None,
                        help='prompts per generate call (default: 256 without --judge, 16 with it: answers there are longer)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--judge', default=None, help='gold, sentiment, reward:PATH, llm:PATH or api:MODEL (judges.py)')
    parser.add_argument('--datasets', nargs='+', default=None,
                        help="with --judge: where the prompts come from, as train.py's datasets (default: the run's)")
    parser.add_argument('--split', default='train', choices=('train', 'test'), help='with --judge: the split')
    parser.add_argument('--pairs', default='best-worst', choices=('best-worst', 'random'),
                        help='with --judge: best against worst of the samples, or two at random (the better chosen)')
    parser.add_argument('--low-gap-fraction', type=float, default=None,
                        help='with --judge: each prompt gives, with this probability, its two closest-scored samples '
                             '(a low-gap pair), else its best against its worst (default: off, --pairs decides)')
    parser.add_argument('--max-new-tokens', type=int, default=256, help='with --judge: most tokens per answer')
    parser.add_argument('--max-prompt-length', type=int, default=256, help='with --judge: a longer prompt keeps its end')
    parser.add_argument('--judge-batch-size', type=int, default=8, help='verdicts or reward-model rows per batch')
    parser.add_argument('--judge-max-new-tokens', type=int, default=128, help='most tokens of a pairwise verdict')
    args = parser.parse_args(argv)
    if args.n_prompts is not None and args.n_prompts < 1:
        parser.error(f'--n-prompts={args.n_prompts} must be a positive integer')
    if args.batch_size is None:
        args.batch_size = 256 if args.judge is None else 16
    if args.samples < 0 or args.batch_size < 1:
        parser.error(f'--samples={args.samples} must be 0 or more and --batch-size={args.batch_size} positive')
    if args.judge is not None and args.samples < 2:
        parser.error(f'--samples={args.samples}: a pair needs at least 2 samples per prompt')
    if not args.temperature > 0:
        parser.error(f'--temperature={args.temperature} must be positive')
    for name in ('flip_fraction', 'low_gap_fraction'):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            parser.error(f'--{name.replace("_", "-")}={value} must be in [0, 1]')
    if args.low_gap_fraction is not None and (args.judge is None or args.pairs == 'random'):
        parser.error('--low-gap-fraction mixes the closest and the farthest pair of each prompt\'s judged samples: it '
                     'needs --judge and the default --pairs best-worst')
    if args.judge is not None:
        from judges import judge_problems
        problems = judge_problems(args.judge)
        if problems:
            parser.error('; '.join(problems))
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.judge is None:
        synthetic_pairs(args)
    else:
        judged_pairs(args)


def synthetic_pairs(args: argparse.Namespace) -> None:
    """The gold answer against the run's own mistakes (the module docstring's second part)."""
    run_dir = Path(args.run_dir)
    policy, tokenizer, config = load_run_policy(run_dir)
    options = synthetic_options(OmegaConf.to_container(config.synthetic, resolve=True))
    flip_fraction = options['flip_fraction'] if args.flip_fraction is None else args.flip_fraction
    prompts = synthetic_prompts(options['n_test'] + options['n_train'])[options['n_test']:][:args.n_prompts]
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    rows, start = [], time.time()
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        greedy = answer(policy, tokenizer, batch, 1, None)
        samples = answer(policy, tokenizer, batch, args.samples, args.temperature) if args.samples else [[]] * len(batch)
        rows.extend(r for r in (make_pair(p, g[0], s, rng, flip_fraction) for p, g, s in zip(batch, greedy, samples))
                    if r is not None)
        print(f'\r{min(i + args.batch_size, len(prompts))}/{len(prompts)} prompts, {len(rows)} pairs, '
              f'{time.time() - start:.0f} s', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    atomic_write_text(args.out, ''.join(json.dumps(r) + '\n' for r in rows))
    print(f'{args.out}: {describe(rows, len(prompts))}')


# ----------------------------------------------------------------------------------------------------------
# Pairs from any prompts, ranked by a judge


def sample_scores(judge, prompts: Sequence, samples: Sequence[Sequence[str]],
                  pairs: Sequence[Optional[Sequence[int]]]) -> List[List[Optional[float]]]:
    """A score per sample of each prompt, all prompts judged in one call (the judge batches them): the scorer's, or
    for a pairwise judge the wins against the prompt's other samples, each two compared in both orders (a tie worth
    ½). Where pairs[k] holds two indices only those two samples of prompt k are compared (the others get None).
    prompts: generation.Prompt (the judge reads its dialogue) or HH-format strings."""
    if not judge.pairwise:
        flat = judge.score([p for p, texts in zip(prompts, samples) for _ in texts], [t for texts in samples for t in texts])
        offsets = [0]
        for texts in samples:
            offsets.append(offsets[-1] + len(texts))
        return [flat[offsets[k]:offsets[k + 1]] for k in range(len(samples))]
    matches = []  # (prompt, i, j)
    for k, (texts, pair) in enumerate(zip(samples, pairs)):
        indices = list(pair) if pair is not None else list(range(len(texts)))
        matches += [(k, i, j) for a, i in enumerate(indices) for j in indices[a + 1:]]
    comparisons = judge.compare([prompts[k] for k, _, _ in matches], [samples[k][i] for k, i, _ in matches],
                                [samples[k][j] for k, _, j in matches])
    wins = [[None] * len(texts) for texts in samples]
    for (k, i, j), c in zip(matches, comparisons):
        wins[k][i] = (wins[k][i] or 0.0) + c.score
        wins[k][j] = (wins[k][j] or 0.0) + 1 - c.score
    return wins


def choose_pair(scores: Sequence[Optional[float]], texts: Sequence[str],
                pair: Optional[Sequence[int]] = None) -> Optional[tuple]:
    """(chosen index, rejected index) of one prompt's samples: the first best-scored against the first worst, or
    with `pair` those two, the better first; None when the two score the same or are the same text."""
    if pair is None:
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    else:
        best, worst = sorted(pair, key=lambda i: -scores[i])
    if scores[best] == scores[worst] or texts[best] == texts[worst]:
        return None
    return best, worst


def closest_pair(scores: Sequence[float], texts: Sequence[str]) -> Optional[tuple]:
    """(better index, worse index) of the two samples whose scores differ least but do differ (different texts; the
    first such two in order on ties): a low-gap pair. None when no two samples differ in score."""
    candidates = [(abs(scores[i] - scores[j]), i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))
                  if scores[i] != scores[j] and texts[i] != texts[j]]
    if not candidates:
        return None
    _, i, j = min(candidates)
    return (i, j) if scores[i] > scores[j] else (j, i)


def mixture_choices(n_prompts: int, seed: int, low_gap_fraction: Optional[float],
                    flip_fraction: float) -> List[tuple]:
    """(low gap?, flipped?) of each prompt, from two generators of their own seeded by `seed`, one draw each per
    prompt: changing one fraction leaves the other's choices as they were. low gap is None without a mixture."""
    gap_rng, flip_rng = random.Random(f'{seed}-gap'), random.Random(f'{seed}-flip')
    return [(None if low_gap_fraction is None else gap_rng.random() < low_gap_fraction,
             flip_rng.random() < flip_fraction) for _ in range(n_prompts)]


def describe_judged(rows: Sequence[Dict], n_prompts: int, judge: str) -> str:
    """'120 pairs from 128 prompts (8 without a preference), mean score gap 0.61 (sentiment); low gap 49% (mean
    gap 0.08), high gap 51% (mean gap 1.12); 20% flipped'."""
    gaps = [abs(r['score_gap']) for r in rows]
    text = (f'{len(rows)} pairs from {n_prompts} prompts ({n_prompts - len(rows)} without a preference), mean score '
            f'gap {sum(gaps) / max(1, len(gaps)):.4g} ({judge})')
    if rows and 'gap_kind' in rows[0]:
        kinds = []
        for kind in ('low', 'high'):
            kind_gaps = [abs(r['score_gap']) for r in rows if r['gap_kind'] == kind]
            kinds.append(f'{kind} gap {100 * len(kind_gaps) / len(rows):.0f}% (mean gap '
                         f'{sum(kind_gaps) / max(1, len(kind_gaps)):.3g})')
        text += '; ' + ', '.join(kinds)
    return text + f'; {100 * sum(r["flipped"] for r in rows) / max(1, len(rows)):.0f}% flipped'


def judged_pairs(args: argparse.Namespace) -> None:
    """Pairs of the model's own samples ranked by --judge, for any prompts (the module docstring's first part)."""
    from generation import encode_prompts, generate, load_model, load_prompts, load_tokenizer_of, model_kind
    from judges import GoldScorer, make_judge
    from utils import get_local_dir
    kind = model_kind(str(args.run_dir))
    config = OmegaConf.load(Path(args.run_dir) / 'config.yaml') if kind == 'run' else None
    datasets = args.datasets or (list(config.datasets) if config is not None else None)
    if not datasets:
        raise ValueError(f'{args.run_dir} is not a run directory: say where the prompts come from with --datasets')
    options = {'synthetic': {**OmegaConf.to_container(config.synthetic, resolve=True), 'train_pairs': None}} \
        if config is not None and 'synthetic' in config else {}
    cache_dir = get_local_dir(list(config.local_dirs)) if config is not None else get_local_dir(['.cache'])
    judge = make_judge(args.judge, args.judge_max_new_tokens, args.judge_batch_size)
    tokenizer = load_tokenizer_of(str(args.run_dir))
    prompts = load_prompts(datasets, args.split, args.n_prompts, tokenizer, cache_dir, options)
    if isinstance(judge, GoldScorer):
        judge.check_prompts([p.text for p in prompts])
    messages = {name: chat_prompt_messages(name, args.split, tokenizer, cache_dir, options)
                for name in {p.dataset for p in prompts if p.chat_rendered}}
    loaded = load_model(str(args.run_dir))
    samples = generate(loaded, encode_prompts(loaded.tokenizer, prompts, args.max_prompt_length), args.samples,
                       args.temperature, 1.0, args.max_new_tokens, args.seed, args.batch_size)
    texts = [[s.completion for s in row] for row in samples]
    rng = random.Random(args.seed)
    pairs = [rng.sample(range(len(t)), 2) if args.pairs == 'random' else None for t in texts]
    scores = sample_scores(judge, prompts, texts, pairs)
    choices = mixture_choices(len(prompts), args.seed, args.low_gap_fraction, args.flip_fraction or 0.0)
    rows = []
    for prompt, prompt_texts, prompt_scores, pair, (low_gap, flipped) in zip(prompts, texts, scores, pairs, choices):
        chosen = closest_pair(prompt_scores, prompt_texts) if low_gap else choose_pair(prompt_scores, prompt_texts, pair)
        if chosen is not None:
            row = pair_row(prompt, prompt_texts, prompt_scores, *(chosen[::-1] if flipped else chosen),
                           messages.get(prompt.dataset), tokenizer)
            rows.append({**row, 'flipped': flipped, **({} if low_gap is None else {'gap_kind': 'low' if low_gap else 'high'})})
    atomic_write_text(args.out, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
    print(f'{args.out}: {describe_judged(rows, len(prompts), args.judge)}')


def pair_row(prompt, texts: Sequence[str], scores: Sequence[float], best: int, worst: int,
             messages: Optional[Dict[str, list]], tokenizer=None) -> Dict:
    """One output row: HH-style strings, or for a chat-rendered prompt its messages and one assistant message per
    response (whose rendering after the prompt is the sampled text)."""
    row = {'prompt': prompt.text, 'chosen': texts[best], 'rejected': texts[worst]}
    if prompt.chat_rendered:
        prompt_messages = messages[prompt.text]
        row = {'prompt': prompt_messages,
               **{key: [{'role': 'assistant', 'content': message_content(tokenizer, prompt_messages, texts[i])}]
                  for key, i in (('chosen', best), ('rejected', worst))}}
    return {**row, 'score_chosen': scores[best], 'score_rejected': scores[worst],
            'score_gap': scores[best] - scores[worst], 'dataset': prompt.dataset}


def message_content(tokenizer, prompt_messages: list, completion: str) -> str:
    """The assistant message whose rendering after `prompt_messages` starts with `completion`: the completion
    without the text some templates put between the generation prompt and a message's content (a role-per-line
    template renders 'assistant:' as the generation prompt but 'assistant: TEXT' as a turn)."""
    mark = 'MESSAGE-CONTENT-PROBE'
    prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt_messages + [{'role': 'assistant', 'content': mark}], tokenize=False)
    gap = full[len(prompt):full.find(mark, len(prompt))] if full.startswith(prompt) and mark in full else ''
    return completion[len(gap):] if gap and completion.startswith(gap) else completion


def chat_prompt_messages(name: str, split: str, tokenizer, cache_dir: str, options: Dict) -> Dict[str, list]:
    """{rendered prompt: its messages} of a data set in the conversational generic form, read as
    data_sources.load_generic reads it, so a pair can be written in the form train.py renders the same way."""
    from data_sources import GENERIC_SCHEMA, LoadRequest, resolve_name, source_rows, split_conversation
    _, _, location = resolve_name(name)
    local = location if Path(location).expanduser().exists() else None
    request = LoadRequest(name, local, split, True, cache_dir, tokenizer, options)
    _, rows = source_rows(request, location, ('prompt', 'chosen', 'rejected'), GENERIC_SCHEMA)
    found = {}
    for _, row in rows:
        try:
            parts = split_conversation(row['prompt'], row['chosen'], row['rejected'], name)
        except (ValueError, KeyError, TypeError):
            continue  # rows load_generic leaves out
        if not isinstance(parts, str):
            found[tokenizer.apply_chat_template(parts[0], tokenize=False, add_generation_prompt=True)] = parts[0]
    return found


if __name__ == '__main__':
    main()
