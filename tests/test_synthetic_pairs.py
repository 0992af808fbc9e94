"""On-policy pairs for the synthetic task: sample_pairs.py's pair rule, the synthetic.train_pairs file that
carries them into training, and the whole path from an SFT run to a DPO run on its own mistakes."""
import json
import random
import re

import pytest

from scripts import sample_pairs
from helpers import FAST, run_dir_from_output, run_train
from preference_datasets import get_dataset, load_tokenized
from synthetic_task import synthetic_gold_answer, synthetic_prompt, synthetic_prompts

REVERSE_CAB = synthetic_prompt('reverse', 'cab')  # gold ' bac'


def train_split(path, **options):
    options = {'n_train': 64, 'n_test': 16, 'train_pairs': str(path), **options}
    return get_dataset('synthetic', 'train', silent=True, dataset_options={'synthetic': options})


def write_rows(path, rows):
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return path


# ----- the pair rule ---------------------------------------------------------------------------------------

def test_a_wrong_greedy_answer_is_the_rejected_one():
    """Greedy ' bc' is wrong: rejected = ' bc' whatever the samples; chosen = the gold ' bac'."""
    row = sample_pairs.make_pair(REVERSE_CAB, ' bc', [' bac', ' cab'], random.Random(0), flip_fraction=0)
    assert row == {'prompt': REVERSE_CAB, 'chosen': ' bac', 'rejected': ' bc', 'greedy_correct': False,
                   'flipped': False}


def test_a_right_greedy_answer_pairs_gold_with_a_wrong_sample():
    """Greedy right: the rejected answer is one of the wrong samples (' bca' or ' ba', never a right one)."""
    rejected = {sample_pairs.make_pair(REVERSE_CAB, ' bac', [' bac', ' bca', 'bac ', ' ba'], random.Random(seed),
                                       flip_fraction=0)['rejected'] for seed in range(20)}
    assert rejected == {' bca', ' ba'}


def test_no_pair_when_every_answer_is_right_and_flips_swap_the_labels():
    assert sample_pairs.make_pair(REVERSE_CAB, ' bac', [' bac', 'bac'], random.Random(0), flip_fraction=0) is None
    row = sample_pairs.make_pair(REVERSE_CAB, ' bca', [], random.Random(0), flip_fraction=1)
    assert (row['chosen'], row['rejected'], row['flipped']) == (' bca', ' bac', True)


# ----- synthetic.train_pairs -------------------------------------------------------------------------------

def test_the_pairs_file_replaces_the_generated_training_pairs(tmp_path):
    """Two rows of one prompt become two pairs of it (responses shared), a flipped row keeps its labels, the
    SFT target is always the gold answer; the test split is still the generated one."""
    train_prompt = synthetic_prompts(16 + 64)[16]
    gold = ' ' + synthetic_gold_answer(train_prompt)
    path = write_rows(tmp_path / 'pairs.jsonl', [
        {'prompt': train_prompt, 'chosen': gold, 'rejected': ' zz', 'greedy_correct': False, 'flipped': False},
        {'prompt': train_prompt, 'chosen': gold, 'rejected': ' yy'},
        {'prompt': REVERSE_CAB, 'chosen': ' bca', 'rejected': ' bac'}])
    data = train_split(path)
    assert data == {train_prompt: {'responses': [gold, ' zz', ' yy'], 'pairs': [(0, 1), (0, 2)], 'sft_target': gold},
                    REVERSE_CAB: {'responses': [' bca', ' bac'], 'pairs': [(0, 1)], 'sft_target': ' bac'}}
    generated_test = get_dataset('synthetic', 'test', silent=True, dataset_options={'synthetic': {'n_train': 64, 'n_test': 16}})
    assert get_dataset('synthetic', 'test', silent=True, dataset_options={
        'synthetic': {'n_train': 64, 'n_test': 16, 'train_pairs': str(path)}}) == generated_test


@pytest.mark.parametrize('row, message', [
    ({'prompt': 'where is it?', 'chosen': ' a', 'rejected': ' b'}, r'row 1: .*is not a synthetic task prompt'),
    ({'prompt': REVERSE_CAB, 'chosen': ' bac'}, "row 1: no 'rejected'"),
    ({'prompt': REVERSE_CAB, 'chosen': ' bac', 'rejected': ' bac'}, 'row 1: chosen and rejected are the same text'),
    ({'prompt': REVERSE_CAB, 'chosen': 3, 'rejected': ' bac'}, "row 1: 'chosen' must be a string"),
    (['not', 'an', 'object'], 'row 1: not a JSON object'),
])
def test_bad_rows_are_named(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        train_split(write_rows(tmp_path / 'pairs.jsonl', [row]))


def test_a_test_prompt_in_the_pairs_file_is_refused(tmp_path):
    """Training on a held-out prompt would inflate gold accuracy: the row is named, whatever its place."""
    test_prompt = synthetic_prompts(16)[3]
    gold = ' ' + synthetic_gold_answer(test_prompt)
    path = write_rows(tmp_path / 'pairs.jsonl', [{'prompt': REVERSE_CAB, 'chosen': ' bac', 'rejected': ' b'},
                                                 {'prompt': test_prompt, 'chosen': gold, 'rejected': ' q'}])
    with pytest.raises(ValueError, match=r'pairs.jsonl row 2: .* is a test prompt of the synthetic task'):
        train_split(path)


def test_a_missing_or_empty_pairs_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='synthetic.train_pairs=.*nowhere.jsonl.*sample_pairs.py'):
        train_split(tmp_path / 'nowhere.jsonl')
    with pytest.raises(ValueError, match='synthetic.train_pairs=7 must be the path'):
        get_dataset('synthetic', 'train', silent=True, dataset_options={'synthetic': {'train_pairs': 7}})


def test_rewriting_the_pairs_file_invalidates_the_tokenization_cache(tmp_path, byte_tokenizer):
    """The cache key holds the file's size and modification time: a new file is tokenized anew."""
    path = write_rows(tmp_path / 'pairs.jsonl', [{'prompt': REVERSE_CAB, 'chosen': ' bac', 'rejected': ' b'}])
    options = {'synthetic': {'n_train': 64, 'n_test': 16, 'train_pairs': str(path)}}

    def responses():
        return load_tokenized('synthetic', byte_tokenizer, 'train', 32, 24, silent=True, cache_dir=str(tmp_path),
                              dataset_options=options).responses
    assert responses() == [' bac', ' b']
    write_rows(path, [{'prompt': REVERSE_CAB, 'chosen': ' bac', 'rejected': ' bacc'}])
    assert responses() == [' bac', ' bacc']


# ----- end to end ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sft_run_to_its_own_pairs_to_dpo(tmp_path):
    """An SFT run of a few steps answers its 64 training prompts: nearly all wrong, so nearly every prompt gives
    a pair of the gold answer against the run's own answer; DPO trains on that file (first loss ln 2)."""
    common = [*FAST, f'local_dirs=[{tmp_path}]', 'n_examples=16']
    sft_dir = run_dir_from_output(run_train([*common, 'loss=sft', 'exp_name=sft'], cwd=tmp_path).stdout)
    out = tmp_path / 'pairs.jsonl'
    sample_pairs.main([str(sft_dir), '--out', str(out), '--samples', '2', '--seed', '1'])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train_prompts = set(synthetic_prompts(16 + 64)[16:])
    assert 60 <= len(rows) <= 64 and {r['prompt'] for r in rows} <= train_prompts
    for r in rows:
        gold = ' ' + synthetic_gold_answer(r['prompt'])
        assert (r['rejected'] if r['flipped'] else r['chosen']) == gold
        assert (r['chosen'] if r['flipped'] else r['rejected']) != gold
    sample_pairs.main([str(sft_dir), '--out', str(tmp_path / 'again.jsonl'), '--samples', '2', '--seed', '1'])
    assert (tmp_path / 'again.jsonl').read_text() == out.read_text()

    output = run_train([*common, 'loss=dpo', 'loss.beta=0.1', 'exp_name=dpo', f'synthetic.train_pairs={out}',
                        f'model.archive={sft_dir}/LATEST/policy.pt'], cwd=tmp_path).stdout
    assert f'pairs from {out}): {len({r["prompt"] for r in rows})} prompts' in output
    dpo_dir = run_dir_from_output(output)
    first = json.loads((dpo_dir / 'metrics.jsonl').read_text().splitlines()[1])
    assert first['split'] == 'train' and first['loss/train'] == pytest.approx(0.6931, abs=1e-3)


def test_sample_pairs_refuses_a_run_on_other_data(tmp_path):
    (tmp_path / 'config.yaml').write_text('datasets: [hh]\n')
    with pytest.raises(ValueError, match=r"trained on datasets=\['hh'\]; on-policy pairs are made for the synthetic task"):
        sample_pairs.main([str(tmp_path), '--out', str(tmp_path / 'p.jsonl')])


@pytest.mark.parametrize('args, message', [
    (['--temperature', '0'], '--temperature=0.0 must be positive'),
    (['--flip-fraction', '1.5'], r'--flip-fraction=1.5 must be in \[0, 1\]'),
    (['--n-prompts', '0'], '--n-prompts=0 must be a positive integer'),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        sample_pairs.main([str(tmp_path), '--out', str(tmp_path / 'p.jsonl'), *args])
    assert info.value.code == 2 and re.search(message, capsys.readouterr().err)
