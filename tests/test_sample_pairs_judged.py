"""On-policy pairs for any data (sample_pairs.py --judge): the pair rule, a reward model ranking a run's own samples
end to end, and chat prompts written so that train.py renders them the same way."""
import copy
import gzip
import json
import re

import pytest

from scripts import sample_pairs
from conftest import CHAT_TEMPLATE, shared, write_rows
from eval_helpers import save_letter_judge, save_reward_model
from generation import Prompt
from judges import make_judge
from data_sources import hh_style_response
from preference_datasets import get_dataset

HH_PROMPT = '\n\nHuman: How do I boil an egg?\n\nAssistant:'


def test_best_against_worst_or_a_random_two():
    """Scores 0.2, 0.9, 0.1, 0.9: best-worst is sample 1 (the first of the two best) against sample 2; the random
    pair (0, 3) puts 3 (0.9) first; equal scores or equal texts give no pair."""
    texts = ['a', 'b', 'c', 'd']
    assert sample_pairs.choose_pair([0.2, 0.9, 0.1, 0.9], texts) == (1, 2)
    assert sample_pairs.choose_pair([0.2, 0.9, 0.1, 0.9], texts, [0, 3]) == (3, 0)
    assert sample_pairs.choose_pair([0.9, 0.2, 0.1, 0.9], texts, [3, 0]) is None
    assert sample_pairs.choose_pair([0.5, 0.5], ['a', 'b']) is None
    assert sample_pairs.choose_pair([0.1, 0.7], ['same', 'same']) is None


@pytest.mark.slow
def test_a_pairwise_judge_ranks_by_wins(tmp_path):
    """A judge answering 'A' to everything: each of 3 samples meets the 2 others, every match scores ½ each way, so
    every sample has 1 win and no pair is made; with a random two, those two get ½ and the third None."""
    judge = make_judge(f'llm:{save_letter_judge(tmp_path / "a", "A", tmp_path)}')
    wins = sample_pairs.sample_scores(judge, [HH_PROMPT, HH_PROMPT], [[' x', ' y', ' z'], [' x', ' y', ' z']],
                                      [None, [2, 0]])
    assert wins == [[1.0, 1.0, 1.0], [0.5, None, 0.5]]
    assert sample_pairs.choose_pair(wins[0], [' x', ' y', ' z']) is None


@pytest.mark.slow
def test_a_reward_model_ranks_the_runs_own_samples(short_sft_run, tmp_path):
    """6 prompts, 3 samples each at T=1 (the run's short, varied answers), ranked by a reward model: each row's
    chosen and rejected are two of the prompt's samples with the reward model's scores, the best against the worst;
    the file is the same for the same seed and train.py reads it as a generic data set."""
    reward_model = save_reward_model(tmp_path / 'rm')
    out = tmp_path / 'pairs.jsonl'
    args = [str(short_sft_run), '--judge', f'reward:{reward_model}', '--n-prompts', '6', '--samples', '3',
            '--max-new-tokens', '12', '--seed', '3', '--out', str(out)]
    sample_pairs.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 4 <= len(rows) <= 6  # a prompt whose 3 samples are one text gives none
    scorer = make_judge(f'reward:{reward_model}')
    for row in rows:
        chosen, rejected = scorer.score([row['prompt']] * 2, [row['chosen'], row['rejected']])
        assert (row['score_chosen'], row['score_rejected']) == (pytest.approx(chosen, abs=1e-5), pytest.approx(rejected, abs=1e-5))
        assert row['score_gap'] == pytest.approx(chosen - rejected) and row['score_gap'] > 0
        assert row['dataset'] == 'synthetic' and row['prompt'].startswith('\n\nHuman: ')
    sample_pairs.main([*args[:-1], str(tmp_path / 'again.jsonl')])
    assert (tmp_path / 'again.jsonl').read_text() == out.read_text()
    data = get_dataset(str(out), 'train', silent=True)  # a file of 6 rows or fewer: int(6 · 1%) = 0 test rows
    assert {p: e['responses'] for p, e in data.items()} == {
        r['prompt']: [hh_style_response(r['chosen']), hh_style_response(r['rejected'])] for r in rows}


def test_chat_prompts_are_written_as_messages(tmp_path, byte_tokenizer):
    """Prompts of the UltraFeedback messages slice rendered with a role-per-line chat template (generation prompt
    'assistant:', a turn 'assistant: TEXT<|endoftext|>\n'): sampled answers ' Sure.' and ' No.' are written as the
    prompt's messages and assistant messages 'Sure.' and 'No.', which train.py renders back to the same prompt text
    and the sampled answers, each closed by the template."""
    source = shared('ultrafeedback', 'test.messages.jsonl.gz')
    rows = [json.loads(line) for line in gzip.decompress(source.read_bytes()).decode().splitlines()[:20]]
    path = write_rows(tmp_path / 'chat.jsonl', rows)
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = sample_pairs.chat_prompt_messages(str(path), 'train', tokenizer, str(tmp_path), {})
    assert len(messages) == 20
    texts = list(messages)[:2]
    written = [sample_pairs.pair_row(Prompt(t, '', str(path), True), [' Sure.', ' No.'], [0.7, 0.1], 0, 1, messages,
                                     tokenizer) for t in texts]
    assert written[0]['prompt'] == messages[texts[0]] and written[0]['score_gap'] == pytest.approx(0.6)
    assert written[0]['chosen'] == [{'role': 'assistant', 'content': 'Sure.'}]
    data = get_dataset(str(write_rows(tmp_path / 'pairs.jsonl', written)), 'train', silent=True, tokenizer=tokenizer)
    assert sorted(data) == sorted(texts)
    assert all(entry['responses'] == [' Sure.<|endoftext|>\n', ' No.<|endoftext|>\n'] for entry in data.values())


@pytest.mark.parametrize('args, message', [
    (['--judge', 'gpt4'], r"judge='gpt4' is unknown"),
    (['--judge', 'sentiment', '--samples', '1'], '--samples=1: a pair needs at least 2 samples per prompt'),
])
def test_bad_judged_arguments_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        sample_pairs.main([str(tmp_path), '--out', str(tmp_path / 'p.jsonl'), *args])
    assert info.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_a_model_directory_needs_datasets(short_sft_run, tmp_path):
    with pytest.raises(ValueError, match=r'hf_model is not a run directory: say where the prompts come from with --datasets'):
        sample_pairs.main([str(short_sft_run / 'hf_model'), '--judge', 'sentiment', '--out', str(tmp_path / 'p.jsonl')])
