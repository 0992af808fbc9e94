"""The controlled-sentiment task (sentiment_task.py): deterministic prompts on disjoint films, neutral words,
files that train.py's generic conversational loader reads."""
import copy

import pytest

import preference_datasets as pd
from conftest import CHAT_TEMPLATE
from experiments.sentiment_task import (GENRES, OPENINGS, SUBJECTS, SYSTEM_PROMPT, TITLE_ADJECTIVES, TITLE_NOUNS, main,
                                        sentiment_prompts, sentiment_rows, split_titles, write_sentiment_task)


def vader(text):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer().polarity_scores(text)['compound']


def test_first_test_prompts_worked():
    """The seeded streams pin the prompts: the first held-out prompt, a review, and the first training prompt,
    a continuation; a prompt is a system and a user message."""
    first_test, first_train = sentiment_prompts('test', 1)[0], sentiment_prompts('train', 1)[0]
    assert first_test.instruction == 'Write a short review of "The Distant River", a mystery about a young architect.'
    assert (first_test.kind, first_test.title, first_test.genre, first_test.subject) == (
        'review', 'The Distant River', 'mystery', 'a young architect')
    assert first_train.kind == 'continue'
    assert first_train.instruction.startswith('Continue this review of the ') and first_train.instruction.endswith(', and')
    assert first_test.messages == [{'role': 'system', 'content': SYSTEM_PROMPT},
                                   {'role': 'user', 'content': first_test.instruction}]


def test_deterministic_distinct_and_held_out_films():
    """576 titles, 144 held out; the same call gives the same prompts; a split's first prompts do not depend on
    how many are drawn; no title (so no prompt) is shared between train and test; about half are reviews."""
    test_titles, train_titles = set(split_titles('test')), set(split_titles('train'))
    assert (len(test_titles), len(train_titles)) == (144, 432) and not test_titles & train_titles
    train, test = sentiment_prompts('train', 600), sentiment_prompts('test', 200)
    assert train == sentiment_prompts('train', 600) and sentiment_prompts('train', 50) == train[:50]
    assert len({p.instruction for p in train}) == 600 and len({p.instruction for p in test}) == 200
    assert {p.title for p in test} <= test_titles and {p.title for p in train} <= train_titles
    assert 250 < sum(p.kind == 'review' for p in train) < 350


def test_prompt_words_carry_no_sentiment_and_the_code_made_pairs_do():
    """VADER scores every word list entry 0, so the completion alone decides the gold reward; the code-made
    responses are plainly positive (> 0.8) and negative (< -0.8), for both kinds of prompt."""
    texts = [*TITLE_ADJECTIVES, *TITLE_NOUNS, *GENRES, *SUBJECTS, *OPENINGS, SYSTEM_PROMPT]
    assert [t for t in texts if vader(t) != 0] == []
    rows = sentiment_rows('test', 20)
    assert {r['kind'] for r in rows} == {'review', 'continue'}
    for row in rows:
        assert vader(row['chosen'][0]['content']) > 0.8 and vader(row['rejected'][0]['content']) < -0.8


def test_files_load_as_generic_conversational_data(tmp_path, byte_tokenizer):
    """sentiment_task.py --out DIR writes DIR/{train,test}.jsonl; get_dataset(DIR) renders each prompt's system and
    user messages with the chat template, the code-made positive response preferred."""
    main(['--out', str(tmp_path), '--n-train', '12', '--n-test', '5'])
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    test = pd.get_dataset(str(tmp_path), 'test', silent=True, tokenizer=tokenizer)
    train = pd.get_dataset(str(tmp_path), 'train', silent=True, tokenizer=tokenizer)
    assert (len(train), len(test)) == (12, 5) and not set(train) & set(test)
    first = sentiment_prompts('test', 1)[0]
    prompt = f'system: {SYSTEM_PROMPT}\nuser: {first.instruction}\nassistant:'
    assert test[prompt]['sft_target'] == f' "{first.title}" is a wonderful {first.genre}: moving, funny and ' \
                                         f'beautifully made. I loved it.<|endoftext|>\n'
    assert test[prompt]['pairs'] == [(0, 1)]


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"n=-1 must be a non-negative integer \(the number of test prompts\)"):
        sentiment_prompts('test', -1)
    with pytest.raises(ValueError, match="split='valid' must be one of train, test"):
        split_titles('valid')
    with pytest.raises(SystemExit):
        main(['--out', str(tmp_path), '--n-train', '0'])
    assert write_sentiment_task(tmp_path, 1, 1)['test'].read_text().count('\n') == 1
