"""experiments/real_hh.py's split of the real HH harmless slice by prompt: rows unchanged, no prompt on both sides, and
train.py's `hh:DIR` loader reads the two files as the train and test splits."""
import gzip
import json
from collections import Counter

from conftest import shared
from experiments.real_hh import held_out, prompt_of, split_by_prompt


def test_prompt_of_keeps_the_dialogue_up_to_the_last_assistant_turn():
    dialogue = '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: See you'
    assert prompt_of(dialogue) == '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:'


def test_split_by_prompt_of_the_real_slice(tmp_path):
    """2,312 rows → 2,078 + 234 (a tenth of the prompts by their SHA-256, 10.1% of the rows); every row is kept
    byte for byte, and each of the 2 prompts that occur twice has both its rows on one side (one of them in test:
    233 held-out prompts, 234 pairs)."""
    source = shared('hh-rlhf', 'harmless-base-test.jsonl.gz')
    assert split_by_prompt(source, tmp_path) == {'train': 2078, 'test': 234}
    original = gzip.open(source, 'rt', encoding='utf-8').read().splitlines()
    parts = {split: gzip.open(tmp_path / f'{split}.jsonl.gz', 'rt', encoding='utf-8').read().splitlines()
             for split in ('train', 'test')}
    assert Counter(parts['train'] + parts['test']) == Counter(original)
    prompts = {split: [prompt_of(json.loads(line)['chosen']) for line in lines] for split, lines in parts.items()}
    assert not set(prompts['train']) & set(prompts['test'])
    assert all(held_out(p) for p in prompts['test']) and not any(held_out(p) for p in prompts['train'])

    import preference_datasets as pd
    test = pd.get_dataset(f'hh:{tmp_path}', 'test', silent=True)
    assert set(test) == set(prompts['test']) and len(test) == 233
    assert sum(len(entry['pairs']) for entry in test.values()) == 234
