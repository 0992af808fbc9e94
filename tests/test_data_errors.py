"""A user's mistakes in data names and files give errors that name the file, row or column."""
import gzip
import json

import pytest
from conftest import HH_ROWS, SHP_ROWS, write_rows

import data_sources as ds

import preference_datasets as pd


def test_unknown_name_lists_the_valid_forms():
    with pytest.raises(ValueError, match=r"Unknown dataset 'hhh'. Valid: hh, shp, se .*hh:PATH, shp:PATH, se:PATH.*Hub id"):
        pd.get_dataset('hhh', 'train')


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}/nope.jsonl: no such file'):
        pd.get_dataset(f'hh:{tmp_path}/nope.jsonl', 'train')
    with pytest.raises(FileNotFoundError, match="no such file"):
        pd.get_dataset(f'{tmp_path}/nope.jsonl', 'train')
    write_rows(tmp_path / 'test.jsonl', HH_ROWS[:1])
    with pytest.raises(FileNotFoundError, match=r"no file for the 'train' split; expected one of train.jsonl, train.jsonl.gz"):
        pd.get_dataset(f'hh:{tmp_path}', 'train')


def test_wrong_schema_names_missing_columns(tmp_path):
    write_rows(tmp_path / 'test.jsonl', [{'prompt': 'p', 'chosen': 'c', 'rejected': 'r'}])
    with pytest.raises(ValueError, match=r"missing columns \['history', 'human_ref_A', 'human_ref_B', 'score_A', 'score_B', 'labels'\].*"
                                         r'expected rows like \{"post_id"'):
        pd.get_dataset(f'shp:{tmp_path}', 'test')


def test_empty_file(tmp_path):
    (tmp_path / 'test.jsonl').write_text('\n')
    with pytest.raises(ValueError, match=f'{tmp_path}/test.jsonl: the file is empty'):
        pd.get_dataset(f'hh:{tmp_path}', 'test')


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    lines = [json.dumps(row).encode() for row in HH_ROWS[:2]] + [b'{"chosen": "caf\xe9", "rejected": "x"}']
    (tmp_path / 'test.jsonl.gz').write_bytes(gzip.compress(b'\n'.join(lines)))
    with pytest.raises(ValueError, match=r'test.jsonl.gz: not UTF-8 text \(invalid byte at offset \d+, line 3\)'):
        pd.get_dataset(f'hh:{tmp_path}', 'test')


def test_wrong_type_names_row_and_column(tmp_path):
    write_rows(tmp_path / 'test.jsonl', [HH_ROWS[0], {'chosen': 3, 'rejected': 'x'}])
    with pytest.raises(ValueError, match=r"test.jsonl row 2: 'chosen' must be a string, got int 3"):
        pd.get_dataset(f'hh:{tmp_path}', 'test')
    rows = [dict(SHP_ROWS[0], score_A='10')]
    write_rows(tmp_path / 'shp' / 'test.jsonl', rows)
    with pytest.raises(ValueError, match=r"row 1: 'score_A' must be an integer or a number, got str '10'"):
        pd.get_dataset(f'shp:{tmp_path / "shp"}', 'test')


def test_a_few_malformed_lines_are_skipped_with_their_numbers(tmp_path):
    """8 good rows and 2 broken JSON lines (3 and 7): a warning naming them, 8 pairs kept."""
    lines = [json.dumps(row) for row in HH_ROWS[:4] * 2]
    lines.insert(2, '{"chosen": "trunc')
    lines.insert(6, 'not json')
    (tmp_path / 'test.jsonl').write_text('\n'.join(lines) + '\n')
    with pytest.warns(ds.DataWarning, match=r'left out 2 of 10 rows: 2 not a JSON object \(rows 3, 7\)'):
        data = pd.get_dataset(f'hh:{tmp_path}', 'test', silent=True)
    assert sum(len(e['pairs']) for e in data.values()) == 8


def test_invalid_json_document(tmp_path):
    (tmp_path / 'test.json').write_text('[{"chosen": 1,')
    with pytest.raises(ValueError, match=r'test.json: not valid JSON \(line 1'):
        pd.get_dataset(f'hh:{tmp_path}', 'test')


def test_bad_lengths_and_missing_stop():
    with pytest.raises(ValueError, match='n_epochs or n_examples'):
        next(pd.get_batch_iterator(['hh'], tokenizer=None))
    with pytest.raises(ValueError, match='max_prompt_length < max_length'):
        next(pd.get_batch_iterator(['hh'], tokenizer=None, n_epochs=1, max_length=64, max_prompt_length=64))
