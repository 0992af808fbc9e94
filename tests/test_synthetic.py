"""The synthetic task (datasets=[synthetic]) and its gold evaluation (gold_eval/accuracy)."""
import pytest
import torch
import torch.nn as nn

from helpers import FAST, compose_config
from preference_datasets import get_dataset
from synthetic_task import (describe_synthetic, edit_distance, synthetic_gold_accuracy, synthetic_gold_answer,
                            synthetic_instruction, synthetic_prompt)
from utils import ASSISTANT, HUMAN


def synthetic(split, **options):
    return get_dataset('synthetic', split, silent=True, dataset_options={'synthetic': options})


def chosen_and_rejected(entry):
    (i, j), = entry['pairs']
    return entry['responses'][i], entry['responses'][j]


def test_gold_answers_worked_by_hand():
    """'cab': reverse 'bac', uppercase 'CAB', sort 'abc', double 'ccaabb'."""
    answers = {op: synthetic_gold_answer(synthetic_prompt(op, 'cab')) for op in ('reverse', 'uppercase', 'sort', 'double')}
    assert answers == {'reverse': 'bac', 'uppercase': 'CAB', 'sort': 'abc', 'double': 'ccaabb'}
    assert synthetic_prompt('reverse', 'cab') == '\n\nHuman: reverse cab\n\nAssistant:'


def test_a_prompt_of_another_task_is_refused():
    with pytest.raises(ValueError, match='not a synthetic task prompt'):
        synthetic_instruction('\n\nHuman: translate cab\n\nAssistant:')


def test_edit_distance_worked():
    """kitten → sitting: k→s, e→i, +g = 3; one dropped letter = 1; equal = 0."""
    assert edit_distance('kitten', 'sitting') == 3
    assert edit_distance('bac', 'bc') == 1
    assert edit_distance('bac', 'bac') == 0


def test_deterministic_disjoint_and_hh_format():
    """The same options give the same data; train and test share no prompt; the test split does not
    depend on n_train (it comes first in the prompt stream); every prompt is one HH turn."""
    train, test = synthetic('train', n_train=300, n_test=50), synthetic('test', n_train=300, n_test=50)
    assert train == synthetic('train', n_train=300, n_test=50)
    assert (len(train), len(test)) == (300, 50)
    assert not set(train) & set(test)
    assert synthetic('test', n_train=10, n_test=50) == test
    for prompt, entry in {**train, **test}.items():
        assert prompt.startswith(HUMAN + ' ') and prompt.endswith(ASSISTANT) and prompt.count(HUMAN) == 1
        assert entry['sft_target'] == ' ' + synthetic_gold_answer(prompt)
        assert all(r.startswith(' ') for r in entry['responses']) and len(entry['pairs']) == 1


def test_mixture_and_flips_as_configured():
    """400 training pairs with low_gap_fraction 0.3, flip_fraction 0.2: near misses (gold vs one edit) and
    flips near 30% and 20% (binomial sd 2.3% and 2.0%); every other pair is at least 2 edits off; the test
    split is never flipped."""
    train = synthetic('train', n_train=400, n_test=50, low_gap_fraction=0.3, flip_fraction=0.2)
    near_miss = flipped = 0
    for prompt, entry in train.items():
        chosen, rejected = chosen_and_rejected(entry)
        gold = entry['sft_target']
        flipped += chosen != gold
        wrong = chosen if chosen != gold else rejected
        assert gold in (chosen, rejected) and wrong != gold
        distance = edit_distance(gold.strip(), wrong.strip())
        assert distance >= 1
        near_miss += distance == 1
    assert abs(near_miss / 400 - 0.3) < 0.07 and abs(flipped / 400 - 0.2) < 0.06
    assert describe_synthetic(train) == f'{100 * near_miss / 400:.1f}% near-miss pairs, {100 * flipped / 400:.1f}% flipped'
    test = synthetic('test', n_train=400, n_test=200, flip_fraction=0.5)
    assert all(chosen_and_rejected(entry)[0] == entry['sft_target'] for entry in test.values())


def test_raising_the_low_gap_fraction_only_turns_pairs_into_near_misses():
    """Each pair's draws are seeded by its prompt, so the near misses at 0.3 stay near misses at 0.6."""
    def near_misses(fraction):
        data = synthetic('train', n_train=200, n_test=10, low_gap_fraction=fraction, flip_fraction=0)
        return {p for p, e in data.items() if edit_distance(*(r.strip() for r in e['responses'])) == 1}
    low, high = near_misses(0.3), near_misses(0.6)
    assert low < high and 0.5 < len(high) / 200 < 0.7


@pytest.mark.parametrize('options, message', [
    ({'n_trian': 5}, 'unknown option.*synthetic.n_trian'),
    ({'flip_fraction': 1.5}, r'synthetic.flip_fraction=1.5 must be a fraction in \[0, 1\]'),
    ({'n_test': 0}, 'synthetic.n_test=0 must be a positive integer'),
    ({'n_gold_eval': -1}, 'synthetic.n_gold_eval=-1 must be an integer'),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        synthetic('train', **options)


def test_gold_accuracy_of_strings():
    """Right once stripped (' bac', 'bac \\n'), wrong ('ba', 'BAC'), no continuation (None): 2 of 5 = 0.4."""
    prompt = synthetic_prompt('reverse', 'cab')
    assert synthetic_gold_accuracy([prompt] * 5, [' bac', 'bac \n', 'ba', 'BAC', None]) == pytest.approx(0.4)
    assert synthetic_gold_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match='2 prompts but 1 completions'):
        synthetic_gold_accuracy([prompt, prompt], ['bac'])


class AnswersUppercaseOnly(nn.Module):
    """A stand-in policy whose greedy output is known: it answers the 'uppercase' prompts right and every
    other prompt with 'x', each followed by EOS and padding, like a Hugging Face model's generate()."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.weight = nn.Parameter(torch.zeros(1))  # trainers find the device through the parameters

    def generate(self, input_ids, attention_mask, max_length, do_sample, pad_token_id, synced_gpus=False):
        assert not do_sample, 'gold evaluation decodes greedily'
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            operation, _ = synthetic_instruction(prompt)
            answer = ' ' + synthetic_gold_answer(prompt) if operation == 'uppercase' else ' x'
            continuation = self.tokenizer(answer, add_special_tokens=False)['input_ids'] + [self.tokenizer.eos_token_id]
            rows.append(torch.cat([ids, torch.tensor(continuation)]))
        width = max(len(r) for r in rows) + 3
        return torch.stack([torch.cat([r, torch.full((width - len(r),), pad_token_id)]) for r in rows])


def test_gold_eval_worked_case(tmp_path):
    """The first 16 test prompts hold 4 'uppercase' ones (reverse, uppercase, uppercase, double, reverse,
    reverse, sort, uppercase, sort, reverse, sort, double, double, uppercase, double, double), so the
    stand-in scores 4/16 = 0.25; with n_gold_eval=8 (one eval batch: the first 8 hold 3) 3/8 = 0.375;
    0 turns it off."""
    import trainers
    from models import load_tokenizer
    config = compose_config([*FAST, 'loss=sft', 'synthetic.n_gold_eval=16'], tmp_path)
    tokenizer = load_tokenizer(config)
    trainer = trainers.BasicTrainer(AnswersUppercaseOnly(tokenizer), config, 0, str(tmp_path / 'run'),
                                    device=torch.device('cpu'))
    assert trainer.gold_eval_enabled()
    assert trainer.gold_eval() == {'gold_eval/accuracy': 0.25}
    config.synthetic.n_gold_eval = 8
    assert trainer.gold_eval() == {'gold_eval/accuracy': 0.375}
    config.synthetic.n_gold_eval = 0
    assert not trainer.gold_eval_enabled()
