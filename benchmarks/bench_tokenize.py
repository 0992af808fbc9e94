"""Tokenization throughput: batched + cached (preference_datasets) against the original's one pair at a time.

    python benchmarks/bench_tokenize.py            # real HH harmless-base test slice, GPT-NeoX tokenizer
    python benchmarks/bench_tokenize.py --sft      # the same in SFT mode (prompt, sft_target)
    python benchmarks/bench_tokenize.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        --tokenizer ../shared/data/tokenizers/gpt-neox-20b --max-length 512 --max-prompt-length 128 --repeats 5

Prints pairs/s for: the original's `tokenize_batch_element` called per pair (re-implemented below, as in
eric-mitchell/direct-preference-optimization), our `tokenize_split` alone, a first run of `load_tokenized`
(parse the file, tokenize, write the cache) and a second, cached run. It also checks that both produce the
same token ids for every pair.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

import preference_datasets as pd  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


def original_tokenize_batch_element(prompt, chosen, rejected, truncation_mode, tokenizer, max_length, max_prompt_length):
    """The original's per-pair tokenization (three tokenizer calls, Python truncation), for comparison."""
    chosen_tokens = tokenizer(chosen, add_special_tokens=False)
    rejected_tokens = tokenizer(rejected, add_special_tokens=False)
    prompt_tokens = tokenizer(prompt, add_special_tokens=False)

    assert tokenizer.eos_token_id not in prompt_tokens['input_ids'], f'Prompt contains EOS token: {prompt}'
    assert tokenizer.eos_token_id not in chosen_tokens['input_ids'], f'Chosen response contains EOS token: {chosen}'
    assert tokenizer.eos_token_id not in rejected_tokens['input_ids'], f'Rejected response contains EOS token: {rejected}'

    chosen_tokens['input_ids'].append(tokenizer.eos_token_id)
    chosen_tokens['attention_mask'].append(1)
    rejected_tokens['input_ids'].append(tokenizer.eos_token_id)
    rejected_tokens['attention_mask'].append(1)

    longer_response_length = max(len(chosen_tokens['input_ids']), len(rejected_tokens['input_ids']))
    if len(prompt_tokens['input_ids']) + longer_response_length > max_length:
        if truncation_mode == 'keep_start':
            prompt_tokens = {k: v[:max_prompt_length] for k, v in prompt_tokens.items()}
        elif truncation_mode == 'keep_end':
            prompt_tokens = {k: v[-max_prompt_length:] for k, v in prompt_tokens.items()}
        else:
            raise ValueError(f'Unknown truncation mode: {truncation_mode}')
    if len(prompt_tokens['input_ids']) + longer_response_length > max_length:
        chosen_tokens = {k: v[:max_length - max_prompt_length] for k, v in chosen_tokens.items()}
        rejected_tokens = {k: v[:max_length - max_prompt_length] for k, v in rejected_tokens.items()}

    chosen_sequence_tokens = {k: prompt_tokens[k] + chosen_tokens[k] for k in chosen_tokens}
    rejected_sequence_tokens = {k: prompt_tokens[k] + rejected_tokens[k] for k in rejected_tokens}
    chosen_sequence_tokens['labels'] = chosen_sequence_tokens['input_ids'][:]
    chosen_sequence_tokens['labels'][:len(prompt_tokens['input_ids'])] = [-100] * len(prompt_tokens['input_ids'])
    rejected_sequence_tokens['labels'] = rejected_sequence_tokens['input_ids'][:]
    rejected_sequence_tokens['labels'][:len(prompt_tokens['input_ids'])] = [-100] * len(prompt_tokens['input_ids'])

    batch = {'prompt': prompt, 'chosen': prompt + chosen, 'rejected': prompt + rejected,
             'chosen_response_only': chosen, 'rejected_response_only': rejected}
    for k, toks in {'chosen': chosen_sequence_tokens, 'rejected': rejected_sequence_tokens, 'prompt': prompt_tokens}.items():
        for type_key, tokens in toks.items():
            if type_key != 'token_type_ids':
                batch[f'{k}_{type_key}'] = tokens
    return batch


def best_times(repeats, runs):
    """{name: (smallest wall time, last result)} over `repeats` rounds, the runs interleaved in each round
    so that a slow spell of a shared machine does not land on one of them only."""
    times, results = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), results[name]) for name in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', default=str(SHARED / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'))
    parser.add_argument('--tokenizer', default=str(SHARED / 'tokenizers' / 'gpt-neox-20b'))
    parser.add_argument('--max-length', type=int, default=512)
    parser.add_argument('--max-prompt-length', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=5, help='best of this many interleaved rounds (each first run uses a fresh cache)')
    parser.add_argument('--sft', action='store_true', help='SFT mode: (prompt, sft_target) examples, one per prompt')
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        # The slice is one file of test rows: a directory holding it as test.* makes it the whole 'test' split.
        name = Path(tmp) / 'hh'
        name.mkdir()
        (name / 'test.jsonl.gz').symlink_to(Path(args.data).resolve())
        name = f'hh:{name}'
        data = pd.get_dataset(name, 'test', silent=True)
        if args.sft:  # the original calls tokenize_batch_element(prompt, sft_target, sft_target, ...)
            pairs = [(prompt, entry['sft_target'], entry['sft_target']) for prompt, entry in data.items()]
        else:
            pairs = [(prompt, entry['responses'][i], entry['responses'][j]) for prompt, entry in data.items() for i, j in entry['pairs']]
        lengths = (args.max_length, args.max_prompt_length)
        tokenizer('warm up', add_special_tokens=False)

        caches = iter(tempfile.mkdtemp(dir=tmp) for _ in range(args.repeats))
        load = lambda cache_dir: pd.load_tokenized(name, tokenizer, 'test', *lengths, sft_mode=args.sft, silent=True, cache_dir=cache_dir)
        load(tmp + '/c')  # fills the cache the 'cached' run reads
        timed = best_times(args.repeats, {
            'original': lambda: [original_tokenize_batch_element(p, c, r, 'keep_end', tokenizer, *lengths) for p, c, r in pairs],
            'ours': lambda: pd.tokenize_split(data, tokenizer, 'keep_end', *lengths, sft_mode=args.sft),
            'first': lambda: load(next(caches)),
            'cached': lambda: load(tmp + '/c')})
        (t_orig, orig), (t_ours, ours), (t_first, _), (t_cached, _) = timed.values()

        for e, element in enumerate(orig):  # same ids for every pair
            assert list(ours.prompt_ids[e]) == element['prompt_input_ids'], e
            assert list(ours.prompt_ids[e]) + list(ours.chosen_ids[e]) == element['chosen_input_ids'], e
            if not args.sft:
                assert list(ours.prompt_ids[e]) + list(ours.rejected_ids[e]) == element['rejected_input_ids'], e

    n = len(pairs)
    print(f'{n} {"SFT examples" if args.sft else "pairs"} of {args.data}, tokenizer {args.tokenizer}, max_length {args.max_length}, '
          f'max_prompt_length {args.max_prompt_length}, {os.cpu_count()} CPUs, best of {args.repeats}')
    print(f'original, one pair at a time      {n / t_orig:9.0f} pairs/s  ({t_orig:.2f} s)')
    print(f'tokenize_split (batched)          {n / t_ours:9.0f} pairs/s  ({t_ours:.2f} s)  {t_orig / t_ours:.1f}x')
    print(f'load_tokenized, first run         {n / t_first:9.0f} pairs/s  ({t_first:.2f} s)  {t_orig / t_first:.1f}x  '
          '(parse file + tokenize + write cache)')
    print(f'load_tokenized, cached            {n / t_cached:9.0f} pairs/s  ({t_cached:.3f} s)  {t_orig / t_cached:.0f}x')
    print('token ids identical to the original for every pair')


if __name__ == '__main__':
    main()
