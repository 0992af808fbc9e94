"""The β-DPO paper's pair mixture in sample_pairs.py --judge: low-gap and high-gap pairs, flipped labels."""
import json
import re

import pytest

from scripts import sample_pairs
from eval_helpers import save_reward_model


def test_closest_pair_worked():
    """Scores 0.2, 0.9, 0.1, 0.85: the gaps are 0.7, 0.1, 0.65, 0.8, 0.05, 0.75; the smallest, 0.05, is samples 1
    and 3, the better (0.9) first. Equal scores and equal texts never make a pair: 0.5, 0.5, 0.7 gives the first of
    the two 0.2 gaps, (2, 0); one text three times gives none."""
    assert sample_pairs.closest_pair([0.2, 0.9, 0.1, 0.85], ['a', 'b', 'c', 'd']) == (1, 3)
    assert sample_pairs.closest_pair([0.5, 0.5, 0.7], ['a', 'b', 'c']) == (2, 0)
    assert sample_pairs.closest_pair([0.1, 0.4, 0.9], ['x', 'x', 'x']) is None
    assert sample_pairs.closest_pair([0.3, 0.3], ['a', 'b']) is None


def test_mixture_choices_follow_their_fractions_independently():
    """2,000 prompts: about 30% low gap and 20% flipped (binomial sd 1.0% and 0.9%); raising the flip fraction to
    0.4 keeps every low-gap choice and every flip made at 0.2 (one uniform draw per prompt, flipped below E);
    without a mixture the low-gap choice is None and the flips are the same."""
    at_02 = sample_pairs.mixture_choices(2000, 7, 0.3, 0.2)
    at_04 = sample_pairs.mixture_choices(2000, 7, 0.3, 0.4)
    assert 0.27 < sum(low for low, _ in at_02) / 2000 < 0.33
    assert 0.17 < sum(flip for _, flip in at_02) / 2000 < 0.23
    assert [low for low, _ in at_02] == [low for low, _ in at_04]
    assert all(flip_04 for (_, flip_02), (_, flip_04) in zip(at_02, at_04) if flip_02)
    assert sample_pairs.mixture_choices(2000, 7, None, 0.2) == [(None, flip) for _, flip in at_02]
    assert sample_pairs.mixture_choices(5, 7, 0.3, 0.2) == at_02[:5]


def test_describe_judged_worked():
    """Two pairs: low gap 0.1, high gap 0.9 flipped (score_gap -0.9): mean gap 0.5, half of each kind, 50% flipped."""
    rows = [{'score_gap': 0.1, 'gap_kind': 'low', 'flipped': False},
            {'score_gap': -0.9, 'gap_kind': 'high', 'flipped': True}]
    assert sample_pairs.describe_judged(rows, 3, 'sentiment') == (
        '2 pairs from 3 prompts (1 without a preference), mean score gap 0.5 (sentiment); low gap 50% (mean gap 0.1), '
        'high gap 50% (mean gap 0.9); 50% flipped')


@pytest.mark.slow
def test_mixture_of_a_runs_own_samples(short_sft_run, tmp_path):
    """16 prompts, 4 samples each, ranked by a reward model, half low-gap pairs, half flipped: a low-gap row's gap is
    at most a high-gap row's typical one, a flipped row's chosen scores below its rejected, and with the same seed and
    no flips the file holds the same pairs, each flipped one swapped back."""
    reward_model = save_reward_model(tmp_path / 'rm')
    args = [str(short_sft_run), '--judge', f'reward:{reward_model}', '--n-prompts', '16', '--samples', '4',
            '--max-new-tokens', '8', '--seed', '1', '--low-gap-fraction', '0.5']
    sample_pairs.main([*args, '--flip-fraction', '0.5', '--out', str(tmp_path / 'noisy.jsonl')])
    sample_pairs.main([*args, '--out', str(tmp_path / 'clean.jsonl')])
    noisy, clean = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                    for name in ('noisy.jsonl', 'clean.jsonl'))
    assert len(noisy) == len(clean) >= 12 and {r['gap_kind'] for r in clean} == {'low', 'high'}
    low = [r['score_gap'] for r in clean if r['gap_kind'] == 'low']
    high = [r['score_gap'] for r in clean if r['gap_kind'] == 'high']
    assert max(low) <= sorted(high)[len(high) // 2] and min(low) > 0 and not any(r['flipped'] for r in clean)
    assert any(r['flipped'] for r in noisy) and not all(r['flipped'] for r in noisy)
    for n, c in zip(noisy, clean):
        assert n['gap_kind'] == c['gap_kind'] and n['prompt'] == c['prompt']
        if n['flipped']:
            assert (n['chosen'], n['rejected'], n['score_gap']) == (c['rejected'], c['chosen'], pytest.approx(-c['score_gap']))
        else:
            assert (n['chosen'], n['rejected']) == (c['chosen'], c['rejected'])


@pytest.mark.parametrize('args, message', [
    (['--judge', 'sentiment', '--low-gap-fraction', '1.5'], r'--low-gap-fraction=1.5 must be in \[0, 1\]'),
    (['--judge', 'sentiment', '--low-gap-fraction', '0.5', '--pairs', 'random'], 'needs --judge and the default --pairs'),
    (['--low-gap-fraction', '0.5'], 'needs --judge'),
])
def test_bad_mixture_arguments_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        sample_pairs.main([str(tmp_path), '--out', str(tmp_path / 'p.jsonl'), *args])
    assert info.value.code == 2 and re.search(message, capsys.readouterr().err)
