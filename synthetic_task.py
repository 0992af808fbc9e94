"""The generated task with a gold answer that code checks (datasets=[synthetic]), and its gold checker.

    python train.py datasets=[synthetic]          # the embedded default's data
    from synthetic_task import gold_eval_accuracy, synthetic_gold_accuracy, synthetic_prompts
    synthetic_gold_accuracy(prompts, completions)  # fraction answered exactly right
    gold_eval_accuracy(test_batches, greedy)       # the same, greedy(batch) -> prompt + answer texts (gold_eval/accuracy)

A prompt asks for one operation on a word of 3–6 random letters, in the HH format:
    '\\n\\nHuman: reverse cab\\n\\nAssistant:'  ->  ' bac'
Each prompt has one pair, the gold answer against a rejected answer that is either
    a near miss, one edit away: a letter replaced, dropped or added (' bqc', ' bc', ' baxc'), a
        low reward gap, the kind of mistake a half-trained model makes; a fraction `low_gap_fraction`
        of the pairs; or
    clearly wrong, at least two edits away: the word left unchanged (' cab') or random letters; a
        high gap that a model learns to tell apart early.
A fraction `flip_fraction` of the training pairs prefers the wrong answer (label noise); test pairs are
never flipped, so eval reward accuracy measures agreement with the truth. The SFT target is always the
gold answer. The test prompts come first in one seeded stream of distinct prompts and the training
prompts after them, so the test set (and gold evaluation) does not change with n_train. Each pair is drawn
from a generator seeded by its split and prompt: changing a fraction changes only the pairs that cross
it. The data set is fixed; the run's `seed` changes the order of training, not the data.
`train_pairs` (a JSON lines file, e.g. a model's own mistakes written by sample_pairs.py) replaces the
generated training pairs; the test split stays the generated one (data_sources.load_synthetic reads it).
"""
import random
import string
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from utils import ASSISTANT, HUMAN


SYNTHETIC_OPERATIONS: Dict[str, Callable[[str], str]] = {
    'reverse': lambda word: word[::-1],
    'uppercase': str.upper,
    'sort': lambda word: ''.join(sorted(word)),
    'double': lambda word: ''.join(c + c for c in word),
}


SYNTHETIC_WORD_LENGTHS = (3, 6)


SYNTHETIC_SEED = 'synthetic-v1'


# The defaults of the options are the `synthetic:` block of config/config.yaml (one place for them).
SYNTHETIC_CONFIG = Path(__file__).resolve().parent / 'config' / 'config.yaml'


def synthetic_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """config.yaml's `synthetic:` block updated with `options`; ValueError naming a bad key or value."""
    from omegaconf import OmegaConf
    defaults = OmegaConf.to_container(OmegaConf.load(SYNTHETIC_CONFIG).synthetic)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f'unknown option(s) synthetic.{", synthetic.".join(unknown)}; the synthetic task knows '
                         f'{", ".join(sorted(defaults))} (see the synthetic: block of config/config.yaml)')
    merged = {**defaults, **options}
    problems = [f'synthetic.{key}={merged[key]!r} must be a positive integer' for key in ('n_train', 'n_test')
                if not (isinstance(merged[key], int) and merged[key] > 0)]
    problems += [f'synthetic.{key}={merged[key]!r} must be a fraction in [0, 1]'
                 for key in ('low_gap_fraction', 'flip_fraction')
                 if not (isinstance(merged[key], (int, float)) and 0 <= merged[key] <= 1)]
    if merged['train_pairs'] is not None and not (isinstance(merged['train_pairs'], str) and merged['train_pairs']):
        problems.append(f'synthetic.train_pairs={merged["train_pairs"]!r} must be the path of a JSON lines file '
                        f'(written by sample_pairs.py) or null')
    if not (isinstance(merged['n_gold_eval'], int) and merged['n_gold_eval'] >= 0):
        problems.append(f'synthetic.n_gold_eval={merged["n_gold_eval"]!r} must be an integer, 0 to turn gold '
                        f'evaluation off (more than n_test scores the whole test split)')
    if problems:
        raise ValueError('invalid synthetic task options:\n  - ' + '\n  - '.join(problems))
    return merged


def synthetic_prompt(operation: str, word: str) -> str:
    """The HH-format prompt asking for `operation` on `word`."""
    return f'{HUMAN} {operation} {word}{ASSISTANT}'


def synthetic_instruction(prompt: str) -> Tuple[str, str]:
    """(operation, word) of a synthetic prompt; ValueError for any other text."""
    body = prompt[len(HUMAN) + 1:-len(ASSISTANT)] if prompt.startswith(HUMAN + ' ') and prompt.endswith(ASSISTANT) else ''
    operation, _, word = body.partition(' ')
    if operation not in SYNTHETIC_OPERATIONS or not word.isalpha():
        raise ValueError(f'{prompt!r} is not a synthetic task prompt (expected {synthetic_prompt("reverse", "cab")!r})')
    return operation, word


def synthetic_gold_answer(prompt: str) -> str:
    """The correct response to a synthetic prompt, without the leading space ('reverse cab' -> 'bac')."""
    operation, word = synthetic_instruction(prompt)
    return SYNTHETIC_OPERATIONS[operation](word)


def synthetic_gold_accuracy(prompts: Sequence[str], completions: Sequence[Optional[str]]) -> float:
    """Fraction of `completions` (the text generated after each prompt, None if there is none) that equal
    the prompt's gold answer once surrounding whitespace is stripped; 0.0 for no prompts."""
    if len(prompts) != len(completions):
        raise ValueError(f'{len(prompts)} prompts but {len(completions)} completions')
    correct = sum(c is not None and c.strip() == synthetic_gold_answer(p) for p, c in zip(prompts, completions))
    return correct / len(prompts) if prompts else 0.0


def gold_eval_accuracy(batches: Iterable[Dict], generate: Callable[[Dict], List[str]]) -> float:
    """The fraction of the prompts of `batches` that `generate` answers exactly right (`synthetic_gold_accuracy`):
    the trainer's gold_eval/accuracy.

    generate(batch) -> the decoded prompt + continuation of each of the batch's prompts (EOS and padding are
    skipped special tokens); a text that does not start with its prompt has no answer and counts as wrong.
    """
    prompts, completions = [], []
    for batch in batches:
        texts = generate(batch)
        prompts.extend(batch['prompt'])
        completions.extend(text[len(prompt):] if text.startswith(prompt) else None
                           for prompt, text in zip(batch['prompt'], texts))
    return synthetic_gold_accuracy(prompts, completions)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest letter substitutions, insertions and deletions turning a into b."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _near_miss(answer: str, rng: random.Random) -> str:
    """The answer one edit away: a letter replaced, dropped or added (same case), the mistakes a
    half-trained model makes. A rejected response with a small reward gap; the dropped and added
    letters also contrast where the answer stops (without them DPO learns to suppress EOS)."""
    i = rng.randrange(len(answer))
    edit = rng.choice(('replace', 'drop', 'insert'))
    if edit == 'drop':
        return answer[:i] + answer[i + 1:]
    letters = string.ascii_uppercase if answer[i].isupper() else string.ascii_lowercase
    if edit == 'insert':
        return answer[:i] + rng.choice(letters) + answer[i:]
    return answer[:i] + rng.choice([c for c in letters if c != answer[i]]) + answer[i + 1:]


def _clearly_wrong(word: str, answer: str, rng: random.Random) -> str:
    """The word unchanged (ignoring the instruction) or random letters, at least 2 edits from the answer."""
    if rng.random() < 0.5 and edit_distance(answer, word) >= 2:
        return word
    while True:
        guess = ''.join(rng.choice(string.ascii_lowercase) for _ in range(len(answer)))
        if edit_distance(answer, guess) >= 2:
            return guess


def synthetic_prompts(n: int) -> List[str]:
    """The first n distinct prompts of the task's fixed seeded stream (test prompts first, then train)."""
    rng = random.Random(SYNTHETIC_SEED)
    prompts, seen = [], set()
    while len(prompts) < n:
        operation = rng.choice(sorted(SYNTHETIC_OPERATIONS))
        word = ''.join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*SYNTHETIC_WORD_LENGTHS)))
        if (operation, word) not in seen:
            seen.add((operation, word))
            prompts.append(synthetic_prompt(operation, word))
    return prompts


def synthetic_pair(prompt: str, split: str, low_gap_fraction: float, flip_fraction: float) -> Tuple[str, str]:
    """(chosen, rejected) responses of a prompt, each with its leading space, drawn by a generator seeded
    by (split, prompt); flipped (the wrong answer chosen) only in the train split."""
    rng = random.Random(f'{SYNTHETIC_SEED}-{split}-{prompt}')
    operation, word = synthetic_instruction(prompt)
    answer = SYNTHETIC_OPERATIONS[operation](word)
    low_gap, flip = rng.random() < low_gap_fraction, rng.random() < flip_fraction
    rejected = _near_miss(answer, rng) if low_gap else _clearly_wrong(word, answer, rng)
    if split == 'train' and flip:
        return ' ' + rejected, ' ' + answer
    return ' ' + answer, ' ' + rejected


def describe_synthetic(data: Mapping[str, Mapping[str, Any]]) -> str:
    """'48.9% near-miss pairs, 10.2% flipped': the mixture a split actually has."""
    pairs = [(entry['responses'][c], entry['responses'][r], entry['sft_target'])
             for entry in data.values() for c, r in entry['pairs']]
    n = max(1, len(pairs))
    near_miss = sum(edit_distance(chosen.strip(), rejected.strip()) == 1 for chosen, rejected, _ in pairs)
    flipped = sum(chosen != gold for chosen, _, gold in pairs)
    return f'{100 * near_miss / n:.1f}% near-miss pairs, {100 * flipped / n:.1f}% flipped'
