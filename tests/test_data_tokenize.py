"""Tokenization: the original's truncation, special-token text as text, and the disk cache."""
import importlib.util
import os
import warnings

import pytest
import torch
from conftest import HH_ROWS, REPO, write_rows

import data_sources as ds

import preference_datasets as pd
from checkpoints import save_atomically


def original_tokenize_batch_element():
    """The benchmark's re-implementation of the original per-pair function."""
    spec = importlib.util.spec_from_file_location('bench_tokenize', REPO / 'benchmarks' / 'bench_tokenize.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.original_tokenize_batch_element


def test_truncate_pair_worked_values():
    """Prompt 10, chosen 6, rejected 4 tokens. max_length 12: 10 + 6 > 12, so the prompt keeps 5 tokens
    (its end for keep_end, its start for keep_start); 5 + 6 = 11 fits. max_length 8: 5 + 6 > 8 still, so
    both responses are cut to 8 - 5 = 3 tokens."""
    prompt, chosen, rejected = list(range(10)), [20, 21, 22, 23, 24, 25], [30, 31, 32, 33]
    assert pd.truncate_pair(prompt, chosen, rejected, 'keep_end', 12, 5) == ([5, 6, 7, 8, 9], chosen, rejected)
    assert pd.truncate_pair(prompt, chosen, rejected, 'keep_start', 12, 5) == ([0, 1, 2, 3, 4], chosen, rejected)
    assert pd.truncate_pair(prompt, chosen, rejected, 'keep_end', 8, 5) == ([5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32])
    assert pd.truncate_pair(prompt, chosen, rejected, 'keep_end', 16, 5) == (prompt, chosen, rejected)  # 10 + 6 fits
    with pytest.raises(ValueError, match="Unknown truncation mode 'middle'"):
        pd.truncate_pair(prompt, chosen, rejected, 'middle', 8, 5)


@pytest.mark.parametrize('lengths', [(512, 128), (24, 12), (16, 12)])
@pytest.mark.parametrize('mode', ['keep_start', 'keep_end'])
def test_same_ids_as_the_original(tmp_path, byte_tokenizer, mode, lengths):
    """Every (prompt, pair) of the HH fixture gives the original's ids, with and without truncation."""
    write_rows(tmp_path / 'test.jsonl', HH_ROWS[:4])
    data = pd.get_dataset(f'hh:{tmp_path}', 'test', silent=True)
    tokenized = pd.tokenize_split(data, byte_tokenizer, mode, *lengths)
    original = original_tokenize_batch_element()
    e = 0
    for prompt, entry in data.items():
        for i, j in entry['pairs']:
            expected = original(prompt, entry['responses'][i], entry['responses'][j], mode, byte_tokenizer, *lengths)
            p = tokenized.prompt_ids[e].tolist()
            assert p == expected['prompt_input_ids']
            assert p + tokenized.chosen_ids[e].tolist() == expected['chosen_input_ids']
            assert p + tokenized.rejected_ids[e].tolist() == expected['rejected_input_ids']
            e += 1
    assert e == tokenized.n_examples == 4


@pytest.mark.parametrize('tokenizer_name', ['byte_tokenizer', 'neox_tokenizer'])
def test_special_token_text_is_text(request, tokenizer_name):
    """' Say <|endoftext|> now' has EOS only where it is appended: the literal is split into ordinary
    tokens (the original asserts and stops here); decoding gives the text back."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    response = ' Say <|endoftext|> now'
    data = {'\n\nHuman: Quote the token.\n\nAssistant:': {'responses': [response, ' No.'], 'pairs': [(0, 1)], 'sft_target': response}}
    ids = pd.tokenize_split(data, tokenizer, 'keep_start', 512, 128).chosen_ids[0].tolist()
    assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == response


def test_neox_split_special_tokens_ids(neox_tokenizer):
    """tokenizers 0.23: 'Hello <|endoftext|> world' is [12092, 209, 0, 1533] with the token parsed and
    [12092, 654, 93, 423, 1171, 1156, 49651, 1533] with split_special_tokens=True; the flag does not stick."""
    assert pd.encode_texts(neox_tokenizer, ['Hello <|endoftext|> world'], parse_special_tokens=True) == [[12092, 209, 0, 1533]]
    assert pd.encode_texts(neox_tokenizer, ['Hello <|endoftext|> world']) == [[12092, 654, 93, 423, 1171, 1156, 49651, 1533]]
    assert neox_tokenizer('<|endoftext|>', add_special_tokens=False)['input_ids'] == [0]


def test_sft_mode_tokenizes_the_sft_target(byte_tokenizer):
    """One example per prompt: prompt bytes + sft_target bytes + EOS, no rejected ids."""
    data = {'\n\nHuman: a\n\nAssistant:': {'responses': [' x', ' yy'], 'pairs': [(0, 1)], 'sft_target': ' yy'}}
    tokenized = pd.tokenize_split(data, byte_tokenizer, 'keep_start', 512, 128, sft_mode=True)
    assert tokenized.n_examples == 1 and len(tokenized.rejected_ids.values) == 0
    assert byte_tokenizer.decode(tokenized.chosen_ids[0].tolist()) == ' yy<|endoftext|>'


def cache_files(root):
    return sorted(p.name for p in (root / 'beta_dpo' / 'tokenized').iterdir())


def test_cache_hit_skips_loading(tmp_path, byte_tokenizer, toy_source):
    """Second identical call: no load; another max_length, sft_mode or dataset_options: a new entry."""
    def tokenized(**kwargs):
        settings = dict(max_length=64, max_prompt_length=32, sft_mode=False, silent=True, cache_dir=tmp_path)
        return pd.load_tokenized('toy', byte_tokenizer, 'train', **{**settings, **kwargs})
    first = tokenized()
    again = tokenized()
    assert len(toy_source) == 1
    assert again.prompts == first.prompts and (again.chosen_ids.values == first.chosen_ids.values).all()
    tokenized(max_length=128)
    tokenized(sft_mode=True)
    tokenized(dataset_options={'n_prompts': 3})
    assert len(toy_source) == 4 and len(cache_files(tmp_path)) == 4
    assert not [n for n in cache_files(tmp_path) if n.endswith('.tmp')]


def test_cache_key_follows_file_and_tokenizer(tmp_path, byte_tokenizer, neox_tokenizer):
    """Rewriting the file (new size and mtime) or changing the tokenizer gives a new cache entry."""
    path = write_rows(tmp_path / 'data' / 'test.jsonl', HH_ROWS[:2])
    key = lambda tok: pd.cache_path(f'hh:{path.parent}', 'test', tok, 64, 32, False, tmp_path, {})
    before = key(byte_tokenizer)
    assert key(byte_tokenizer) == before and key(neox_tokenizer) != before
    write_rows(path, HH_ROWS[:3])
    os.utime(path, ns=(1, 1))
    assert key(byte_tokenizer) != before


def test_corrupt_cache_is_rebuilt(tmp_path, byte_tokenizer, toy_source):
    pd.load_tokenized('toy', byte_tokenizer, silent=True, cache_dir=tmp_path)
    [name] = cache_files(tmp_path)
    (tmp_path / 'beta_dpo' / 'tokenized' / name).write_bytes(b'not a torch file')
    with pytest.warns(ds.DataWarning, match='unreadable tokenization cache.*rebuilding it'):
        rebuilt = pd.load_tokenized('toy', byte_tokenizer, silent=True, cache_dir=tmp_path)
    assert len(toy_source) == 2 and rebuilt.n_examples == 10
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the rebuilt file reads back cleanly
        pd.load_tokenized('toy', byte_tokenizer, silent=True, cache_dir=tmp_path)
    assert len(toy_source) == 2


def test_failed_write_leaves_nothing(tmp_path):
    """A save that dies half way (here: an object torch cannot pickle) leaves no file and no temp file."""
    path = tmp_path / 'c' / 'x.pt'
    with pytest.raises(Exception):
        save_atomically({'a': torch.zeros(3), 'b': lambda: None}, path)
    assert list(path.parent.iterdir()) == []
