"""Padding with and without length buckets (`length_bucket_batches`), and packed (`padding_free=true`), on real data.

    python benchmarks/bench_padding.py             # real HH harmless-base test slice, GPT-NeoX tokenizer
    python benchmarks/bench_padding.py --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
        --tokenizer ../shared/data/tokenizers/gpt-neox-20b --batch-size 64 --buckets 10 50 --epochs 3

For each setting, over `--epochs` shuffled epochs of the training stream: the mean padding fraction of the
policy's forward pass (`padding/fraction`, chosen and rejected padded to the longer of the two) and the tokens
the policy processes per pair (batch rows × padded width / pairs), the part of a step's compute that padding
inflates. Token ids are the same in every setting; only which examples share a batch changes. The `packed` row:
random batches, their 2 × batch sequences packed first-fit into rows of max_length tokens (logps.pack_sequences,
padding_free=true), rows padded to the longest row.

--steps N also times N DPO steps of `python train.py` per setting (batch --step-batch-size, the first step not
timed) on a GPT-NeoX of the size of EleutherAI/pythia-14m with random weights and the tokenizer's vocabulary,
saved with `save_pretrained` under a temporary directory: pairs/s = pairs / the timed steps' total time.
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


def measure(name: str, tokenizer, args, buckets, cache_dir: str, packed: bool = False):
    """(mean padding fraction, padded tokens per pair, batches) of the stream with these buckets (or packed)."""
    from logps import concatenated_inputs, pack_sequences
    fractions, tokens, pairs = [], 0, 0
    for batch in pd.get_batch_iterator([name], tokenizer, split='train', batch_size=args.batch_size,
                                       n_epochs=args.epochs, max_length=args.max_length,
                                       max_prompt_length=args.max_prompt_length, silent=True, cache_dir=cache_dir,
                                       bucket_batches=buckets):
        if packed:
            both = concatenated_inputs(batch)
            rows = pack_sequences(both['concatenated_input_ids'], both['concatenated_attention_mask'],
                                  both['concatenated_labels'], args.max_length)['sequence']
            fractions.append((rows < 0).float().mean().item())
            tokens += rows.numel()
        else:
            fractions.append(pd.padding_fraction(batch))
            width = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
            tokens += 2 * len(batch['prompt']) * width
        pairs += len(batch['prompt'])
    return sum(fractions) / len(fractions), tokens / pairs, len(fractions)


def build_model(tokenizer_path: str, target: Path) -> Path:
    """A pythia-14m-sized GPT-NeoX (random weights) with the tokenizer's vocabulary, saved with its tokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=2048, rotary_pct=0.25,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                           tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def time_steps(model_dir: Path, name: str, args, buckets, workdir: Path, packed: bool = False,
               beta_dpo: bool = False) -> float:
    """Pairs/s of `python train.py loss=dpo` (β-DPO with beta_dpo) over args.steps steps after the first (from its
    metrics.jsonl)."""
    import json
    import subprocess
    local = workdir / f'runs-{buckets}-{packed}-{beta_dpo}'
    overrides = [f'model.name_or_path={model_dir}', 'model.name=bench', f'datasets=[{name}]', 'loss=dpo', 'loss.beta=0.1',
                 f'padding_free={str(packed).lower()}',
                 *(['loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2'] if beta_dpo else []),
                 f'batch_size={args.step_batch_size}', f'n_examples={args.step_batch_size * (args.steps + 1)}',
                 'eval_every=1000000', 'do_first_eval=false', f'eval_batch_size={args.step_batch_size}',
                 f'n_eval_examples={args.step_batch_size}', f'max_length={args.max_length}',
                 f'max_prompt_length={args.max_prompt_length}', 'optimizer=AdamW', 'lr=1e-5', 'warmup_steps=0',
                 'wandb.enabled=false', 'minimum_log_interval_secs=0', 'sample_during_eval=false',
                 f'local_dirs=[{local}]', f'length_bucket_batches={"null" if buckets is None else buckets}']
    subprocess.run([sys.executable, str(REPO / 'train.py'), *overrides], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in next(local.rglob('metrics.jsonl')).read_text().splitlines()]
    rates = [r['examples_per_second'] for r in records if r['split'] == 'train'][1:]
    return len(rates) * args.step_batch_size / sum(args.step_batch_size / rate for rate in rates)


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
    parser.add_argument('--steps', type=int, default=0, help='also time this many DPO steps per setting (0: no)')
    parser.add_argument('--step-batch-size', type=int, default=16)
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f'{args.data} does not exist: pass --data (an HH-format .jsonl[.gz]) and --tokenizer')
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    name = f'hh:{args.data}'
    with tempfile.TemporaryDirectory() as cache_dir:
        print(f'{args.data.name}, batch {args.batch_size}, max_length {args.max_length}, '
              f'max_prompt_length {args.max_prompt_length}, {args.epochs} epochs')
        model_dir = build_model(args.tokenizer, Path(cache_dir) / 'model') if args.steps else None
        step_columns = (f' DPO pairs/s (batch {args.step_batch_size}) | × | β-DPO pairs/s | × |'
                        if args.steps else '')
        print('| length_bucket_batches | batches | padding fraction | tokens per pair | vs random batches |' + step_columns)
        print('|---|---:|---:|---:|---:|' + ('---:|---:|---:|---:|' if args.steps else ''))
        base = base_rates = None
        for buckets, packed in [(None, False), *[(b, False) for b in args.buckets], (None, True)]:
            fraction, per_pair, n = measure(name, tokenizer, args, buckets, cache_dir, packed)
            base = base or per_pair
            label = 'null, packed (padding_free=true)' if packed else buckets
            row = f'| {label} | {n} | {fraction:.3f} | {per_pair:.0f} | {per_pair / base:.2f}× |'
            if args.steps:
                rates = [time_steps(model_dir, name, args, buckets, Path(cache_dir), packed, beta_dpo)
                         for beta_dpo in (False, True)]
                base_rates = base_rates or rates
                row += ''.join(f' {rate:.2f} | {rate / b:.2f}× |' for rate, b in zip(rates, base_rates))
            print(row, flush=True)


if __name__ == '__main__':
    main()
