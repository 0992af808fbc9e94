"""Loaders on small fixture files in the exact upstream schemas: hh, shp, se, the generic format, the registry."""
import warnings

import numpy as np
import pytest
from conftest import CHAT_TEMPLATE, HH_ROWS, SE_ROWS, SHP_ROWS, write_rows

import data_sources as ds

import preference_datasets as pd


def load_quietly(name, split='test', **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        return pd.get_dataset(name, split, silent=True, **kwargs)


def test_hh_fixture(tmp_path):
    """6 rows: 'Hi' twice (merged, sft_target the last chosen), a multi-turn prompt, an empty final
    response (kept, as upstream), a prompt mismatch (row 5) and a row without Assistant (row 6) left out."""
    write_rows(tmp_path / 'test.jsonl', HH_ROWS)
    with pytest.warns(ds.DataWarning) as record:
        data = pd.get_dataset(f'hh:{tmp_path}', 'test', silent=True)
    message = str(record[0].message)
    assert 'left out 2 of 6 rows' in message
    assert "1 chosen and rejected differ before their last '\\n\\nAssistant:' (rows 5)" in message
    assert "1 no '\\n\\nAssistant:' in chosen (rows 6)" in message
    assert list(data) == ['\n\nHuman: Hi\n\nAssistant:', '\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:',
                          '\n\nHuman: X\n\nAssistant:']
    assert data['\n\nHuman: Hi\n\nAssistant:'] == {'responses': [' Hello!', ' Go away.', ' Hey.', ' What?'],
                                                   'pairs': [(0, 1), (2, 3)], 'sft_target': ' Hey.'}
    multi = data['\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:']
    assert multi == {'responses': [' D', ' E'], 'pairs': [(0, 1)], 'sft_target': ' D'}
    assert data['\n\nHuman: X\n\nAssistant:']['responses'] == ['', ' no']


def test_hh_mostly_malformed_is_an_error(tmp_path):
    """2 of 3 rows unusable (> 50%): a ValueError naming the file, not a warning."""
    path = write_rows(tmp_path / 'test.jsonl', HH_ROWS[3:])
    with pytest.raises(ValueError, match=r'2 of 3 rows are unusable.*Expected rows like'):
        pd.get_dataset(f'hh:{path.parent}', 'test', silent=True)


def test_shp_fixture(tmp_path):
    """p1: ratios 5 and 4 kept, merged (pairs (0,1) by labels=1 and (3,2) by labels=0, sft_target the
    score-12 response); p2: ratio 1.25 dropped; p3: ratio exactly 2 kept, B preferred (labels 0)."""
    write_rows(tmp_path / 'train.jsonl.gz', SHP_ROWS)
    data = pd.get_dataset(f'shp:{tmp_path}', 'train', silent=True)
    assert list(data) == ['\n\nHuman: Why is the sky blue?\n\nAssistant:', '\n\nHuman: Best prime?\n\nAssistant:']
    assert data['\n\nHuman: Why is the sky blue?\n\nAssistant:'] == {
        'responses': [' Rayleigh scattering.', ' Magic.', ' Because of the air.', ' Rayleigh scattering, explained.'],
        'pairs': [(0, 1), (3, 2)], 'sft_target': ' Rayleigh scattering, explained.'}
    assert data['\n\nHuman: Best prime?\n\nAssistant:'] == {'responses': [' Two.', ' Seven.'], 'pairs': [(1, 0)],
                                                             'sft_target': ' Seven.'}


def test_shp_score_ratio():
    """max(a/b, b/a); only one positive score: infinite (kept); none positive: 1 (dropped)."""
    assert ds.shp_score_ratio(2, 4) == 2.0 and ds.shp_score_ratio(12, 3) == 4.0
    assert ds.shp_score_ratio(0, 5) == float('inf') and ds.shp_score_ratio(0, 0) == 1.0


def test_se_fixture(tmp_path):
    """q1: pm_scores 5, 2, 5: pairs (0,1) and (2,1), the 5-5 tie left out; sft_target the first 5.
    q2 (one answer) and q3 (all tied) keep their prompt with no pairs (usable for SFT, as upstream)."""
    write_rows(tmp_path / 'train.json', SE_ROWS)
    data = pd.get_dataset(f'se:{tmp_path}', 'train', silent=True)
    q1 = '\n\nHuman: How do I print in Python?\n\n<code>print(x)\n</code>\n\nAssistant:'
    assert list(data) == [q1, '\n\nHuman: One answer only?\n\nAssistant:', '\n\nHuman: All tied?\n\nAssistant:']
    assert data[q1] == {'responses': [' Use print & flush.', ' Try logging.', " <code>import sys\nsys.stdout.write('x')</code>"],
                        'pairs': [(0, 1), (2, 1)], 'sft_target': ' Use print & flush.'}
    assert data['\n\nHuman: One answer only?\n\nAssistant:'] == {'responses': [' Yes.'], 'pairs': [], 'sft_target': ' Yes.'}
    assert data['\n\nHuman: All tied?\n\nAssistant:']['pairs'] == []


def test_strip_html_tags():
    """Paragraphs keep the words inside inline tags (the original drops them), code blocks stay as
    <code>...</code>, entities are decoded, lists keep their text, blocks are joined by blank lines."""
    html = ("<p>See <a href='x'>the docs</a> &amp; <em>this</em>:</p><pre><code>if a &lt; b:\n    pass\n</code></pre>"
            "<ul><li>one</li><li>two</li></ul><p>Line<br>break</p>")
    assert ds.strip_html_tags(html) == ('See the docs & this:\n\n<code>if a < b:\n    pass\n</code>\n\none\ntwo'
                                        '\n\nLine\nbreak')
    assert ds.strip_html_tags('<code>x = 1</code>') == '<code>x = 1</code>'


def test_generic_string_form(tmp_path):
    """Plain prompts are wrapped HH-style and responses get a leading space; an HH-style prompt and a
    response already starting with a space are kept as they are; chosen == rejected is left out."""
    rows = [{'prompt': 'What is 2+2?', 'chosen': '4', 'rejected': '5'},
            {'prompt': '\n\nHuman: Hi\n\nAssistant:', 'chosen': ' Hello', 'rejected': ' Bye'},
            {'prompt': 'Same?', 'chosen': 'x', 'rejected': 'x'},
            {'prompt': 'Colour?', 'chosen': 'Red', 'rejected': 'Blue'}]
    write_rows(tmp_path / 'test.jsonl', rows)
    with pytest.warns(ds.DataWarning, match=r'1 chosen and rejected are the same text \(rows 3\)'):
        data = pd.get_dataset(str(tmp_path), 'test', silent=True)
    assert data == {'\n\nHuman: What is 2+2?\n\nAssistant:': {'responses': [' 4', ' 5'], 'pairs': [(0, 1)], 'sft_target': ' 4'},
                    '\n\nHuman: Hi\n\nAssistant:': {'responses': [' Hello', ' Bye'], 'pairs': [(0, 1)], 'sft_target': ' Hello'},
                    '\n\nHuman: Colour?\n\nAssistant:': {'responses': [' Red', ' Blue'], 'pairs': [(0, 1)], 'sft_target': ' Red'}}


def test_generic_message_forms(tmp_path, byte_tokenizer):
    """Both layouts render the same with CHAT_TEMPLATE: prompt 'user: Hi\\nassistant:', responses
    ' Hello<|endoftext|>\\n'-style text (the template's assistant line minus the generation prompt)."""
    import copy
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace('assistant:{% endif %}', 'assistant: {% endif %}')
    whole = [{'prompt': 'Hi', 'chosen': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}],
              'rejected': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Go'}]}]
    completions = [{'prompt': [{'role': 'user', 'content': 'Hi'}], 'chosen': [{'role': 'assistant', 'content': 'Hello'}],
                    'rejected': [{'role': 'assistant', 'content': 'Go'}]}]
    expected = {'user: Hi\nassistant: ': {'responses': ['Hello<|endoftext|>\n', 'Go<|endoftext|>\n'], 'pairs': [(0, 1)],
                                          'sft_target': 'Hello<|endoftext|>\n'}}
    for i, rows in enumerate([whole, completions]):
        write_rows(tmp_path / str(i) / 'train.jsonl', rows)
        assert pd.get_dataset(str(tmp_path / str(i)), 'train', silent=True, tokenizer=tokenizer) == expected


def test_message_form_needs_a_chat_template(tmp_path, byte_tokenizer):
    path = write_rows(tmp_path / 'test.jsonl', [{'prompt': 'Hi', 'chosen': [{'role': 'assistant', 'content': 'a'}],
                                                 'rejected': [{'role': 'assistant', 'content': 'b'}]}])
    with pytest.raises(ValueError, match=rf'{tmp_path}.*conversational form.*use a tokenizer with a chat template'):
        pd.get_dataset(str(tmp_path), 'test', silent=True, tokenizer=byte_tokenizer)
    assert path.exists()


@pytest.mark.parametrize('file_name', ['test.jsonl', 'test.jsonl.gz', 'test.json', 'test.json.gz', 'test.parquet'])
def test_file_formats_give_the_same_data(tmp_path, file_name):
    write_rows(tmp_path / file_name, HH_ROWS[:4])
    assert load_quietly(f'hh:{tmp_path}') == load_quietly(f'hh:{write_rows(tmp_path / "ref" / "test.jsonl", HH_ROWS[:4]).parent}')


def test_json_dict_of_columns(tmp_path):
    import json
    (tmp_path / 'test.json').write_text(json.dumps({'chosen': [r['chosen'] for r in HH_ROWS[:2]],
                                                    'rejected': [r['rejected'] for r in HH_ROWS[:2]]}))
    assert len(load_quietly(f'hh:{tmp_path}')) == 2


def test_deterministic_split_matches_datasets_shuffle():
    """1000 rows: test = the first int(1000 * 0.01) = 10 of numpy's default_rng(42) permutation, which is
    what datasets' shuffle(seed=42) gives: the original's se test split."""
    import datasets
    test, train = ds.deterministic_split(1000, 'test'), ds.deterministic_split(1000, 'train')
    assert len(test) == 10 and len(train) == 990
    assert sorted(np.concatenate([test, train]).tolist()) == list(range(1000))
    shuffled = datasets.Dataset.from_dict({'i': list(range(1000))}).shuffle(seed=42)
    assert test.tolist() == shuffled['i'][:10]
    with pytest.raises(ValueError, match="'train' or 'test'"):
        ds.deterministic_split(10, 'validation')


def test_single_file_is_split(tmp_path):
    """One file of 4 usable rows with test_fraction 0.5: 2 test rows, 2 train rows, disjoint, stable."""
    path = write_rows(tmp_path / 'all.jsonl', HH_ROWS[:4])
    options = {'test_fraction': 0.5}
    test = load_quietly(f'hh:{path}', 'test', dataset_options=options)
    train = load_quietly(f'hh:{path}', 'train', dataset_options=options)
    assert sum(len(e['pairs']) for e in test.values()) == 2 and sum(len(e['pairs']) for e in train.values()) == 2
    assert test == load_quietly(f'hh:{path}', 'test', dataset_options=options)


def test_registry_takes_a_new_source(tmp_path, monkeypatch):
    """A source added to SOURCES (as the coming `synthetic` one) works as 'name' and 'name:PATH' and gets
    dataset_options."""
    def load_toy(request):
        n = request.options['n']
        prompt = f'\n\nHuman: {request.location or "hub"} {request.split}\n\nAssistant:'
        return ds.Loaded({prompt: {'responses': [' a'] * n, 'pairs': [(0, 1)], 'sft_target': ' a'}})
    monkeypatch.setitem(ds.SOURCES, 'toy', ds.Source(load_toy))
    assert list(pd.get_dataset('toy', 'train', dataset_options={'n': 2})) == ['\n\nHuman: hub train\n\nAssistant:']
    assert list(pd.get_dataset('toy:x', 'test', dataset_options={'n': 2})) == ['\n\nHuman: x test\n\nAssistant:']


def test_hub_path_with_a_local_directory(tmp_path, monkeypatch):
    """The Hub branch goes through datasets.load_dataset; pointed at a local directory it loads offline
    and gives what the local reader gives. For `se` the Hub's only split is 'train', divided 99/1."""
    write_rows(tmp_path / 'hh' / 'test.jsonl', HH_ROWS[:4])
    write_rows(tmp_path / 'se' / 'train.jsonl', SE_ROWS * 100)
    hub = {'Anthropic/hh-rlhf': str(tmp_path / 'hh'), 'HuggingFaceH4/stack-exchange-preferences': str(tmp_path / 'se')}
    original = ds.load_hub_dataset
    monkeypatch.setattr(ds, 'load_hub_dataset', lambda hub_id, split, request: original(
        hub[hub_id], split, ds.LoadRequest(request.name, None, split, True, str(tmp_path / 'hf'))))
    assert pd.get_dataset('hh', 'test', silent=True) == load_quietly(f'hh:{tmp_path / "hh"}')
    se_test = pd.get_dataset('se', 'test', silent=True)
    assert se_test == load_quietly(f'se:{tmp_path / "se" / "train.jsonl"}', 'test')
    test_rows = ds.deterministic_split(300, 'test')  # int(300 * 0.01) = 3 rows
    assert sum(len(e['responses']) for e in se_test.values()) == sum(len(SE_ROWS[i % 3]['answers']) for i in test_rows)


def test_special_token_text_in_a_message_is_left_out(tmp_path, byte_tokenizer):
    """Chat-rendered text keeps the template's special tokens as control tokens, so a message that
    itself contains '<|endoftext|>' would become one: that row (2 of 3) is left out, with a warning."""
    import copy
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    row = lambda answer: {'prompt': 'Hi', 'chosen': [{'role': 'assistant', 'content': answer}],
                          'rejected': [{'role': 'assistant', 'content': 'no'}]}
    write_rows(tmp_path / 'test.jsonl', [row('a'), row('say <|endoftext|>'), row('b')])
    with pytest.warns(ds.DataWarning, match=r'1 special-token text inside a message \(rows 2\)'):
        data = pd.get_dataset(str(tmp_path), 'test', silent=True, tokenizer=tokenizer)
    assert data['user: Hi\nassistant:']['responses'] == [' a<|endoftext|>\n', ' no<|endoftext|>\n', ' b<|endoftext|>\n', ' no<|endoftext|>\n']
