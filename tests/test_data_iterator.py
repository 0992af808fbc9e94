"""get_batch_iterator: the original's stopping, shuffling and batch layout; determinism; resuming at example k.

The 'toy' source (conftest) has 5 prompts with 2 pairs each: 10 examples per epoch in DPO mode, 5 in SFT
mode. The byte tokenizer gives one token per UTF-8 byte, <|endoftext|> = 256, <pad> = 257.
"""
import pytest
import torch
from conftest import toy_data

import data_sources as ds

import preference_datasets as pd

PAD, EOS = 257, 256


def batches(tokenizer, tmp_path, names=('toy',), **kwargs):
    settings = dict(batch_size=2, silent=True, cache_dir=tmp_path, max_length=64, max_prompt_length=32)
    return list(pd.get_batch_iterator(list(names), tokenizer, **{**settings, **kwargs}))


def examples(batch_list):
    """(prompt, chosen response) of every example, in order."""
    return [(p, c) for b in batch_list for p, c in zip(b['prompt'], b['chosen_response_only'])]


def test_n_examples_checked_after_each_batch(tmp_path, byte_tokenizer, toy_source):
    """n_examples=6, batch 4: the check after the 2nd batch stops it at 8 examples, as the original."""
    out = batches(byte_tokenizer, tmp_path, batch_size=4, n_examples=6)
    assert [len(b['prompt']) for b in out] == [4, 4]


def test_n_epochs_drops_the_last_partial_batch(tmp_path, byte_tokenizer, toy_source):
    """10 examples, batch 4, 2 epochs: 2 batches per epoch (the 2 left over are dropped, as the original),
    8 different examples in each epoch, and the two epochs in different orders."""
    out = batches(byte_tokenizer, tmp_path, batch_size=4, n_epochs=2)
    assert len(out) == 4
    epoch0, epoch1 = examples(out[:2]), examples(out[2:])
    assert len(set(epoch0)) == len(set(epoch1)) == 8 and epoch0 != epoch1


def test_unshuffled_order_and_pairs_of_a_prompt_stay_together(tmp_path, byte_tokenizer, toy_source):
    data = toy_data('t')
    expected = [(p, e['responses'][i]) for p, e in data.items() for i, _ in e['pairs']]
    assert examples(batches(byte_tokenizer, tmp_path, shuffle=False, n_epochs=1)) == expected
    shuffled = examples(batches(byte_tokenizer, tmp_path, n_epochs=1))
    prompts = [p for p, _ in shuffled]
    assert all(prompts[2 * k] == prompts[2 * k + 1] for k in range(5)) and sorted(shuffled) == sorted(expected)


def test_deterministic_for_a_seed(tmp_path, byte_tokenizer, toy_source):
    run = lambda seed: examples(batches(byte_tokenizer, tmp_path, n_epochs=3, seed=seed))
    assert run(0) == run(0) and run(0) != run(1)


@pytest.mark.parametrize('start', [4, 3, 10, 13])
def test_start_example_continues_the_same_stream(tmp_path, byte_tokenizer, toy_source, start):
    """Skipping k examples yields the unskipped stream from k on (whole batches from k; for k even, the
    very same batches), over epoch boundaries; n_epochs=3 of 10 examples: 30 - k, rounded down to batches."""
    full = examples(batches(byte_tokenizer, tmp_path, n_epochs=3))
    resumed = batches(byte_tokenizer, tmp_path, n_epochs=3, start_example=start)
    assert examples(resumed) == full[start:start + (30 - start) // 2 * 2]
    if start % 2 == 0:
        unskipped = batches(byte_tokenizer, tmp_path, n_epochs=3)[start // 2:]
        assert all(torch.equal(a['chosen_input_ids'], b['chosen_input_ids']) for a, b in zip(resumed, unskipped))


def test_start_example_counts_towards_n_examples(tmp_path, byte_tokenizer, toy_source):
    full = examples(batches(byte_tokenizer, tmp_path, n_examples=8))
    assert examples(batches(byte_tokenizer, tmp_path, n_examples=8, start_example=4)) == full[4:8]
    assert batches(byte_tokenizer, tmp_path, n_examples=8, start_example=8) == []


def test_sft_mode(tmp_path, byte_tokenizer, toy_source):
    """One example per prompt, chosen = prompt + sft_target, no rejected keys."""
    out = batches(byte_tokenizer, tmp_path, sft_mode=True, shuffle=False, n_epochs=1, batch_size=5)
    assert len(out) == 1
    batch = out[0]
    assert set(batch) == {'prompt', 'chosen', 'chosen_response_only', 'prompt_input_ids', 'prompt_attention_mask',
                          'chosen_input_ids', 'chosen_attention_mask', 'chosen_labels'}
    data = toy_data('t')
    assert batch['chosen_response_only'] == [e['sft_target'] for e in data.values()]
    assert batch['chosen'] == [p + e['sft_target'] for p, e in data.items()]


def test_batch_layout(tmp_path, byte_tokenizer, toy_source):
    """First batch unshuffled: prompt 0 (23 bytes) with ' t0r0' (5 bytes + EOS) / ' t0r1!' (6 + EOS), then
    with ' t0r2!!' / ' t0r3!!!'; prompt 1 ('\\n\\nHuman: t1 w\\n\\nAssistant:', 25 bytes) in the 2nd batch.
    Sequences are padded to the longest in the batch, not max_length."""
    first, second = batches(byte_tokenizer, tmp_path, shuffle=False, n_examples=4)
    assert set(first) == {'prompt', 'chosen', 'rejected', 'chosen_response_only', 'rejected_response_only',
                          *(f'{k}_{t}' for k in ('chosen', 'rejected', 'prompt') for t in ('input_ids', 'attention_mask')),
                          'chosen_labels', 'rejected_labels'}
    assert first['rejected_response_only'] == [' t0r1!', ' t0r3!!!']
    assert first['rejected'] == [first['prompt'][0] + ' t0r1!', first['prompt'][1] + ' t0r3!!!']
    assert first['chosen_input_ids'].shape == (2, 23 + 8) and first['rejected_input_ids'].shape == (2, 23 + 9)
    ids, labels, mask = first['chosen_input_ids'], first['chosen_labels'], first['chosen_attention_mask']
    assert (labels[:, :23] == -100).all()  # the prompt
    assert torch.equal(labels[1, 23:], ids[1, 23:]) and ids[1, -1] == EOS  # ' t0r2!!' + EOS: 8 tokens, no padding
    assert ids[0, 23 + 6:].tolist() == [PAD, PAD] and labels[0, 23 + 6:].tolist() == [-100, -100]
    assert mask.sum(1).tolist() == [29, 31]
    assert byte_tokenizer.decode(ids[0, 23:29]) == ' t0r0<|endoftext|>'
    # batch 2 holds prompt 1 (25 bytes) twice: nothing to pad in the prompt; mixed lengths are left-padded
    assert second['prompt_input_ids'].shape == (2, 25) and second['prompt_attention_mask'].all()


def test_prompts_are_left_padded(tmp_path, byte_tokenizer, toy_source):
    """Prompts 0 and 1 (23 and 25 bytes) in one batch: prompt 0 gets 2 pad tokens on the left."""
    batch = batches(byte_tokenizer, tmp_path, shuffle=False, n_examples=1, batch_size=3)[0]
    assert batch['prompt'][1] != batch['prompt'][2]
    ids, mask = batch['prompt_input_ids'], batch['prompt_attention_mask']
    assert ids.shape == (3, 25)
    assert ids[0, :2].tolist() == [PAD, PAD] and mask[0].tolist() == [0, 0] + [1] * 23
    assert byte_tokenizer.decode(ids[0, 2:]) == batch['prompt'][0] and byte_tokenizer.decode(ids[2]) == batch['prompt'][2]


@pytest.mark.parametrize('source, kept', [('toy', 'start'), ('toy_end', 'end')])
def test_long_prompts_truncated_by_source(tmp_path, byte_tokenizer, toy_source, source, kept):
    """max_length 20, max_prompt_length 10: the 23-byte prompt + 6-token response is too long, so the
    prompt keeps its first 10 bytes (keep_start) or its last 10 (keep_end, as hh)."""
    batch = batches(byte_tokenizer, tmp_path, names=[source], shuffle=False, n_examples=1, batch_size=1,
                    max_length=20, max_prompt_length=10)[0]
    prompt = batch['prompt'][0]
    expected = prompt[:10] if kept == 'start' else prompt[-10:]
    assert byte_tokenizer.decode(batch['prompt_input_ids'][0]) == expected
    assert byte_tokenizer.decode(batch['chosen_input_ids'][0, :10]) == expected


def test_several_sources_mix(tmp_path, byte_tokenizer, toy_source):
    """'toy:a' and 'toy:b' together: 20 examples per epoch, shuffled together."""
    out = examples(batches(byte_tokenizer, tmp_path, names=['toy:a', 'toy:b'], n_epochs=1))
    assert len(set(out)) == 20
    assert {p.split()[1][0] for p, _ in out[:10]} == {'a', 'b'}


def test_fewer_examples_than_a_batch_is_an_error(tmp_path, byte_tokenizer, toy_source):
    with pytest.raises(ValueError, match='10 examples, fewer than one batch of 16'):
        batches(byte_tokenizer, tmp_path, batch_size=16, n_examples=100)


def test_padding_fraction():
    """Chosen lengths 3 and 5, rejected 4 and 2, run together padded to 5: 14 real of 20 -> 0.3."""
    mask = lambda lengths, width: torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    batch = {'chosen_attention_mask': mask([3, 5], 5), 'rejected_attention_mask': mask([4, 2], 4),
             'prompt_attention_mask': mask([1, 1], 9)}
    assert pd.padding_fraction(batch) == pytest.approx(0.3)
    assert pd.padding_fraction({'chosen_attention_mask': mask([3, 5], 5)}) == pytest.approx(0.2)  # SFT: 8 of 10


def test_real_hh_first_batch(tmp_path, neox_tokenizer, hh_slice_dir):
    """The real slice through the whole path: pad = EOS (GPT-NeoX has no pad token), prompts at most 128
    tokens once truncated, sequences at most 512."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        batch = next(pd.get_batch_iterator([f'hh:{hh_slice_dir}'], neox_tokenizer, split='test', batch_size=8, n_epochs=1,
                                           silent=True, cache_dir=tmp_path))
    assert batch['chosen_input_ids'].shape[0] == 8 and batch['chosen_input_ids'].shape[1] <= 512
    assert all(p.startswith('\n\nHuman:') and p.endswith('\n\nAssistant:') for p in batch['prompt'])
    n_prompt = batch['prompt_attention_mask'].sum(1)
    for i in range(8):
        assert (batch['chosen_labels'][i, :n_prompt[i]] == -100).all()
    assert 0 < pd.padding_fraction(batch) < 1


def test_bucket_by_length_worked():
    """Examples 0–7 of lengths 5 1 7 3 | 8 2 6 4, batches of 2, windows of 2 batches: the first window sorted is
    1 3 0 2 (lengths 1 3 5 7), so its batches are (1, 3) and (0, 2) in some order; the second (5, 7) and (6, 4)."""
    import numpy as np
    lengths = np.array([5, 1, 7, 3, 8, 2, 6, 4])
    out = pd.bucket_by_length(np.arange(8), lengths, batch_size=2, window=2, seed=0).reshape(-1, 2).tolist()
    assert sorted(out[:2]) == [[0, 2], [1, 3]] and sorted(out[2:]) == [[5, 7], [6, 4]]


def test_length_buckets_pad_less_and_keep_the_stream_a_function_of_the_seed(tmp_path, byte_tokenizer, toy_source):
    """40 toy prompts of 1–40 words (80 examples), batches of 4, windows of 5 batches, 2 epochs: each epoch holds
    the same examples as without buckets, batches pad less on average, the same seed gives the same stream, and
    resuming at example 12 continues it."""
    def run(**kwargs):
        return batches(byte_tokenizer, tmp_path, batch_size=4, n_epochs=2, max_length=256, max_prompt_length=128,
                       dataset_options={'n_prompts': 40}, **kwargs)
    plain, bucketed = run(), run(bucket_batches=5)
    assert len(plain) == len(bucketed) == 40
    for epoch in (slice(0, 20), slice(20, 40)):
        assert sorted(examples(plain[epoch])) == sorted(examples(bucketed[epoch]))
    mean_padding = lambda bs: sum(pd.padding_fraction(b) for b in bs) / len(bs)
    assert mean_padding(bucketed) < 0.5 * mean_padding(plain)
    assert examples(run(bucket_batches=5)) == examples(bucketed) != examples(run(bucket_batches=5, seed=1))
    assert examples(run(bucket_batches=5, start_example=12)) == examples(bucketed)[12:]
