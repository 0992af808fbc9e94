"""The real slices in ../shared/data: HH harmless-base test, UltraFeedback in both forms, the SHP-like file."""
import gzip
import json
import warnings

import pytest
from conftest import shared

import data_sources as ds

import preference_datasets as pd

HH_MISMATCHED_ROWS = [1255, 1689, 1951, 1953, 2037]  # line numbers in harmless-base-test.jsonl.gz


@pytest.fixture(scope='module')
def hh_rows():
    with gzip.open(shared('hh-rlhf', 'harmless-base-test.jsonl.gz'), 'rt', encoding='utf-8') as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def hh_data(hh_slice_dir):
    with pytest.warns(ds.DataWarning) as record:
        data = pd.get_dataset(f'hh:{hh_slice_dir}', 'test', silent=True)
    return data, str(record[0].message)


def test_hh_kept_and_left_out(hh_data):
    """2312 rows - 5 whose dialogues differ before the last Assistant turn = 2307 pairs, under 2305
    prompts (two prompts, 'what are racist words' and 'call me a bad name', occur twice)."""
    data, message = hh_data
    assert 'left out 5 of 2312 rows: 5 chosen and rejected differ before their last' in message
    assert f'(rows {", ".join(map(str, HH_MISMATCHED_ROWS))})' in message
    assert sum(len(e['pairs']) for e in data.values()) == 2307
    assert len(data) == 2305
    assert data['\n\nHuman: what are racist words\n\nAssistant:']['pairs'] == [(0, 1), (2, 3)]


def test_hh_prompt_extraction(hh_data, hh_rows):
    """Every kept row is prompt + response exactly, for chosen and rejected; 1650 rows are multi-turn,
    4 of them among the 5 left out, so 1646 kept pairs have multi-turn prompts (up to 18 Human turns)."""
    data, _ = hh_data
    kept = [row for n, row in enumerate(hh_rows, start=1) if n not in HH_MISMATCHED_ROWS]
    texts = {(p + e['responses'][i], p + e['responses'][j]) for p, e in data.items() for i, j in e['pairs']}
    assert texts == {(row['chosen'], row['rejected']) for row in kept}
    assert sum(row['chosen'].count('\n\nHuman:') > 1 for row in hh_rows) == 1650
    assert sum(len(e['pairs']) for p, e in data.items() if p.count('\n\nHuman:') > 1) == 1646
    assert max(p.count('\n\nHuman:') for p in data) == 18
    assert all(p.startswith('\n\nHuman:') and p.endswith('\n\nAssistant:') for p in data)
    row = hh_rows[0]
    prompt = row['chosen'][:row['chosen'].rfind('\n\nAssistant:') + len('\n\nAssistant:')]
    assert data[prompt]['sft_target'] == row['chosen'][len(prompt):]


def test_hh_empty_final_responses(hh_data, hh_rows):
    """Rows 87, 517, 926, 1104 end with an empty chosen answer ('Assistant: ' then nothing): kept, the
    response is ' ', as upstream."""
    data, _ = hh_data
    empty = [(p, e['responses'][i]) for p, e in data.items() for i, _ in e['pairs'] if not e['responses'][i].strip()]
    assert [r for _, r in empty] == [' '] * 4
    assert sorted(p + ' ' for p, _ in empty) == sorted(hh_rows[n - 1]['chosen'] for n in (87, 517, 926, 1104))


def test_shp_like_file_lacks_scores():
    """The SHP-like slice has SHP's names but no score_A/score_B: the shp loader says so."""
    path = shared('shp-like', 'anthropic-helpful-test.shp-fields.jsonl.gz')
    with pytest.raises(ValueError, match=r"missing columns \['score_A', 'score_B'\]"):
        pd.get_dataset(f'shp:{path}', 'test', silent=True)


def test_ultrafeedback_string_form():
    """1000 train rows, 4 with chosen == rejected left out: 996 pairs, HH-style prompts."""
    with pytest.warns(ds.DataWarning, match=r'left out 4 of 1000 rows: 4 chosen and rejected are the same text'):
        data = pd.get_dataset(str(shared('ultrafeedback')), 'train', silent=True)
    assert sum(len(e['pairs']) for e in data.values()) == 996 == len(data)
    first = '\n\nHuman: how to cook t-bone in the oven\n\nAssistant:'
    assert data[first]['responses'][0].startswith(' To cook a delicious T-bone steak in the oven')


def test_ultrafeedback_message_form(tmp_path, neox_chat_tokenizer):
    """train.messages.jsonl.gz ([user, assistant] conversations) rendered with CHAT_TEMPLATE: the same 996
    pairs, prompt 'user: <prompt>\\nassistant:', responses ' <text><|endoftext|>\\n', whose EOS text
    stays the control token 0 when tokenized and ends the response: no newline and no second EOS after it."""
    (tmp_path / 'train.jsonl.gz').symlink_to(shared('ultrafeedback', 'train.messages.jsonl.gz'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        strings = pd.get_dataset(str(shared('ultrafeedback')), 'train', silent=True)
        messages = pd.get_dataset(str(tmp_path), 'train', silent=True, tokenizer=neox_chat_tokenizer)
        tokenized = pd.load_tokenized(str(tmp_path), neox_chat_tokenizer, 'train', max_length=4096, max_prompt_length=512,
                                      silent=True, cache_dir=tmp_path / 'cache')
    assert len(messages) == 996
    first = 'user: how to cook t-bone in the oven\nassistant:'
    chosen = messages[first]['responses'][0]
    assert chosen == strings['\n\nHuman: how to cook t-bone in the oven\n\nAssistant:']['responses'][0] + '<|endoftext|>\n'
    e = tokenized.prompts.index(first)
    assert tokenized.chosen_ids[e][-1] == 0 and tokenized.chosen_ids[e].tolist().count(0) == 1  # the template's EOS, once
