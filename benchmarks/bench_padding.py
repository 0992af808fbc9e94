"""Padding with and without length buckets (`length_bucket_batches`), on real data.

    python benchmarks/bench_padding.py             # real HH harmless-base test slice, GPT-NeoX tokenizer
    python benchmarks/bench_padding.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        --tokenizer ../shared/data/tokenizers/gpt-neox-20b --batch-size 64 --buckets 10 50 --epochs 3

For each setting, over `--epochs` shuffled epochs of the training stream: the mean padding fraction of the
policy's forward pass (`padding/fraction`, chosen and rejected padded to the longer of the two) and the tokens
the policy processes per pair (batch rows × padded width / pairs), the part of a step's compute that padding
inflates. Token ids are the same in every setting; only which examples share a batch changes.
"""
import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

import preference_datasets as pd  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


def measure(name: str, tokenizer, args, buckets, cache_dir: str):
    """(mean padding fraction, padded tokens per pair, batches) of the stream with these buckets."""
    fractions, tokens, pairs = [], 0, 0
    for batch in pd.get_batch_iterator([name], tokenizer, split='train', batch_size=args.batch_size,
                                       n_epochs=args.epochs, max_length=args.max_length,
                                       max_prompt_length=args.max_prompt_length, silent=True, cache_dir=cache_dir,
                                       bucket_batches=buckets):
        fractions.append(pd.padding_fraction(batch))
        width = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
        tokens += 2 * len(batch['prompt']) * width
        pairs += len(batch['prompt'])
    return sum(fractions) / len(fractions), tokens / pairs, len(fractions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', type=Path, default=SHARED / 'hh-rlhf' / 'harmless-base-test.jsonl.gz',
                        help='an HH-format file (split into train/test as hh:PATH does)')
    parser.add_argument('--tokenizer', default=str(SHARED / 'tokenizers' / 'gpt-neox-20b'))
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--buckets', type=int, nargs='+', default=[10, 50], help='length_bucket_batches values')
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--max-length', type=int, default=512)
    parser.add_argument('--max-prompt-length', type=int, default=256)
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f'{args.data} does not exist: pass --data (an HH-format .jsonl[.gz]) and --tokenizer')
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    name = f'hh:{args.data}'
    with tempfile.TemporaryDirectory() as cache_dir:
        print(f'{args.data.name}, batch {args.batch_size}, max_length {args.max_length}, '
              f'max_prompt_length {args.max_prompt_length}, {args.epochs} epochs')
        print('| length_bucket_batches | batches | padding fraction | tokens per pair | vs random batches |')
        print('|---|---:|---:|---:|---:|')
        base = None
        for buckets in [None, *args.buckets]:
            fraction, per_pair, n = measure(name, tokenizer, args, buckets, cache_dir)
            base = base or per_pair
            print(f'| {buckets} | {n} | {fraction:.3f} | {per_pair:.0f} | {per_pair / base:.2f}× |')


if __name__ == '__main__':
    main()
