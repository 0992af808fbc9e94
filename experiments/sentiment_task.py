"""The controlled-sentiment task of the DPO paper, for an instruct model: review a made-up film, positively.

    python experiments/sentiment_task.py --out sentiment_data          # sentiment_data/{train,test}.jsonl, seconds
    python scripts/sample_pairs.py MODEL --datasets sentiment_data --split train --judge sentiment --out pairs/train.jsonl
    python evaluate.py model=RUN_DIR datasets=[sentiment_data] judge=sentiment reference=MODEL temperatures=[1.0]

    from sentiment_task import sentiment_prompts
    sentiment_prompts('test', 4)[0].messages   # [{'role': 'system', ...}, {'role': 'user', 'content': 'Write ...'}]

Rafailov et al. 2023 (Sec. 6.1, Fig. 2) fine-tune GPT-2 to continue IMDb review prefixes with positive sentiment,
the reward a sentiment classifier's score, and plot reward against KL(π‖π_ref). Here the prompts are generated
from word lists (no download): an instruct model (SmolLM2-135M-Instruct in `make demo-real`) is asked either to
write a one-sentence or short review of a made-up film ('Write a short review of "The Copper Orchard", a western
about a train conductor.') or to continue a review's neutral opening ('... in one sentence: "I watched The Copper
Orchard last night, and'). The gold reward of a completion is its VADER compound sentiment in [-1, 1] (judges.py's
`sentiment` scorer, Hutto & Gilbert 2014): the goal is positive sentiment. The words of the prompts carry no
sentiment of their own (VADER scores every title, genre, subject and opening 0), so the completion alone decides
the reward, and the model's own samples spread widely over it, which gives pairs with low and high reward gaps.

Held out means unseen films: the titles are split once (a fixed seed) into test and training titles, and each
split's prompts are drawn from its own titles by a generator seeded by the split alone, so the test prompts do
not change with n_train and no test prompt or title occurs in training. The files are in the generic
conversational preference format that train.py reads (`datasets=[DIR]`, DIR holding train.jsonl and test.jsonl):
{"prompt": [system, user messages], "chosen": [assistant message], "rejected": [...]}, rendered with the model's
chat template. Their chosen and rejected responses are written by code, a plainly positive review against a
plainly negative one ("... wonderful ... I loved it." / "... dreadful ... I hated it."): the prompts are what the
task is for (sample_pairs.py replaces the pairs with the model's own samples, labelled by the gold reward); the
code-made pairs of the test split measure on held-out films whether a policy's implicit reward prefers the
positive review, and are the reference response a pairwise judge compares against.
"""
import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SENTIMENT_SEED = 'sentiment-v1'

# The system message of every prompt: short (SmolLM2's template would otherwise insert its default one, about
# 20 tokens longer) and neutral about the film.
SYSTEM_PROMPT = 'You write film reviews.'

# Titles are 'The ADJECTIVE NOUN' (24 x 24 = 576 titles, a quarter of them held out); every word is neutral to VADER.
TITLE_ADJECTIVES = ('Silent', 'Copper', 'Paper', 'Northern', 'Glass', 'Hidden', 'Distant', 'Velvet', 'Iron', 'Winter',
                    'Crimson', 'Hollow', 'Painted', 'Western', 'Golden', 'Salt', 'Marble', 'Second', 'Amber', 'Last',
                    'Quiet', 'Silver', 'Long', 'Twelfth')
TITLE_NOUNS = ('Harbor', 'Orchard', 'Kingdom', 'Circus', 'River', 'Lantern', 'Garden', 'Station', 'Mountain', 'Island',
               'Bridge', 'Compass', 'Theater', 'Valley', 'Mirror', 'Tower', 'Meadow', 'Engine', 'Canyon', 'Library',
               'Ferry', 'Window', 'Desert', 'Village')
GENRES = ('drama', 'satire', 'spy film', 'science fiction film', 'documentary', 'western', 'musical', 'mystery',
          'animated film', 'heist film', 'period drama', 'road movie')
SUBJECTS = ('a lighthouse keeper', 'a train conductor', 'a botanist on Mars', 'two rival chefs', 'a chess teacher',
            'a family of beekeepers', 'a retired astronaut', 'a small-town mayor', 'a jazz pianist', 'a mapmaker',
            'a ferry captain', 'three sisters in Lisbon', 'a museum guard', 'a violin maker', 'a radio host',
            'a marathon runner', 'a sheep farmer', 'a young architect', 'a travelling magician', 'a postman in Oslo',
            'a tailor and his apprentice', 'a village school', 'a deep-sea diver', 'a night-shift nurse',
            'a clockmaker', 'two cousins on a road trip', 'a ballet student', 'a submarine crew',
            'a bookshop owner', 'a weather forecaster')
# The two kinds of instruction: a review from scratch, or the continuation of a review's opening (the DPO
# paper's setting: complete a review prefix). `{opening}` is one of OPENINGS, with the title filled in.
REVIEW_INSTRUCTIONS = ('Write a one-sentence review of the {genre} "{title}", about {subject}.',
                       'Write a short review of "{title}", a {genre} about {subject}.')
CONTINUE_INSTRUCTION = 'Continue this review of the {genre} "{title}", about {subject}, in one sentence: "{opening}'
OPENINGS = ('I watched {title} last night, and', 'I saw {title} at the cinema on Sunday, and',
            'My sister and I went to see {title}, and', '{title} runs for two hours, and',
            'I finally watched {title} this week, and', 'We saw {title} after dinner, and')
# The code-made pair of each prompt: a plainly positive against a plainly negative response (VADER about +0.9
# and -0.8); a continuation continues the opening, which ends with 'and'.
POSITIVE_REVIEW = '"{title}" is a wonderful {genre}: moving, funny and beautifully made. I loved it.'
NEGATIVE_REVIEW = '"{title}" is a dreadful {genre}: dull, clumsy and badly made. I hated it.'
POSITIVE_CONTINUATION = 'it was wonderful: moving, funny and beautifully made."'
NEGATIVE_CONTINUATION = 'it was dreadful: dull, clumsy and badly made."'
# The fraction of titles held out for the test split.
TEST_TITLE_FRACTION = 0.25
SPLITS = ('train', 'test')


@dataclass(frozen=True)
class SentimentPrompt:
    """One prompt of the task: its chat messages (system, user) and what it was made of."""
    kind: str        # 'review' or 'continue'
    title: str
    genre: str
    subject: str
    instruction: str  # the user message

    @property
    def messages(self) -> List[Dict[str, str]]:
        return [{'role': 'system', 'content': SYSTEM_PROMPT}, {'role': 'user', 'content': self.instruction}]

    def responses(self) -> Dict[str, str]:
        """{'chosen': the positive response, 'rejected': the negative one} written by code."""
        if self.kind == 'continue':
            return {'chosen': POSITIVE_CONTINUATION, 'rejected': NEGATIVE_CONTINUATION}
        return {'chosen': POSITIVE_REVIEW.format(title=self.title, genre=self.genre),
                'rejected': NEGATIVE_REVIEW.format(title=self.title, genre=self.genre)}


def split_titles(split: str) -> List[str]:
    """The titles of a split: all 576 titles shuffled once by a fixed seed, the first quarter for test."""
    if split not in SPLITS:
        raise ValueError(f'split={split!r} must be one of {", ".join(SPLITS)}')
    titles = [f'The {adjective} {noun}' for adjective in TITLE_ADJECTIVES for noun in TITLE_NOUNS]
    random.Random(f'{SENTIMENT_SEED}-titles').shuffle(titles)
    n_test = round(TEST_TITLE_FRACTION * len(titles))
    return titles[:n_test] if split == 'test' else titles[n_test:]


def sentiment_prompts(split: str, n: int) -> List[SentimentPrompt]:
    """The first n distinct prompts of a split's seeded stream (half reviews, half continuations on average)."""
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f'n={n!r} must be a non-negative integer (the number of {split} prompts)')
    titles = split_titles(split)
    rng = random.Random(f'{SENTIMENT_SEED}-{split}')
    prompts, seen = [], set()
    while len(prompts) < n:
        title, genre, subject = rng.choice(titles), rng.choice(GENRES), rng.choice(SUBJECTS)
        if rng.random() < 0.5:
            kind, instruction = 'review', rng.choice(REVIEW_INSTRUCTIONS).format(title=title, genre=genre, subject=subject)
        else:
            opening = rng.choice(OPENINGS).format(title=title)
            kind, instruction = 'continue', CONTINUE_INSTRUCTION.format(title=title, genre=genre, subject=subject,
                                                                         opening=opening)
        if instruction not in seen:
            seen.add(instruction)
            prompts.append(SentimentPrompt(kind, title, genre, subject, instruction))
    return prompts


def sentiment_rows(split: str, n: int) -> List[Dict]:
    """The rows of a split in the generic conversational format, with what each prompt was made of."""
    rows = []
    for prompt in sentiment_prompts(split, n):
        responses = prompt.responses()
        rows.append({'prompt': prompt.messages,
                     'chosen': [{'role': 'assistant', 'content': responses['chosen']}],
                     'rejected': [{'role': 'assistant', 'content': responses['rejected']}],
                     'kind': prompt.kind, 'title': prompt.title, 'genre': prompt.genre, 'subject': prompt.subject})
    return rows


def write_sentiment_task(out: Path, n_train: int, n_test: int) -> Dict[str, Path]:
    """OUT/train.jsonl and OUT/test.jsonl (each written atomically); their paths by split."""
    from checkpoints import atomic_write_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (('train', n_train), ('test', n_test)):
        paths[split] = out / f'{split}.jsonl'
        atomic_write_text(paths[split], ''.join(json.dumps(row) + '\n' for row in sentiment_rows(split, n)))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--out', type=Path, required=True, help='directory for train.jsonl and test.jsonl')
    parser.add_argument('--n-train', type=int, default=4096, help='training prompts (default 4096)')
    parser.add_argument('--n-test', type=int, default=512, help='held-out prompts, on held-out titles (default 512)')
    args = parser.parse_args(argv)
    for name in ('n_train', 'n_test'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")}={getattr(args, name)} must be a positive integer')
    for split, path in write_sentiment_task(args.out, args.n_train, args.n_test).items():
        print(f'{path}: {getattr(args, "n_" + split)} {split} prompts')


if __name__ == '__main__':
    main()
