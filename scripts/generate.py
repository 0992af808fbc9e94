"""Samples from a trained policy into a JSON lines file (the library is generation.py).

    # 4 samples at temperature 0.7 for the first 64 HH test prompts, from a run's LATEST checkpoint
    python scripts/generate.py RUN_DIR --datasets hh --n-prompts 64 --n 4 --temperature 0.7 --out samples.jsonl

A model source is a run directory of train.py, its hf_model/, a Hugging Face model directory, a .gguf file or
embedded:NAME (generation.load_model). Sampling is seeded: the same seed, prompts and settings give the same text.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for `python scripts/generate.py`

from generation import encode_prompts, generate, load_model, load_prompts, load_tokenizer_of, sample_rows, write_jsonl  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('model', help='run directory, hf_model/, Hugging Face directory, .gguf file or embedded:NAME')
    parser.add_argument('--datasets', nargs='+', default=['synthetic'], help="data sources, as train.py's datasets")
    parser.add_argument('--split', default='test')
    parser.add_argument('--n-prompts', type=int, default=64, help='the first N prompts of each data set')
    parser.add_argument('--n', type=int, default=1, help='samples per prompt')
    parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
    parser.add_argument('--top-p', type=float, default=1.0)
    parser.add_argument('--max-new-tokens', type=int, default=128)
    parser.add_argument('--max-prompt-length', type=int, default=256)
    parser.add_argument('--batch-size', type=int, default=16, help='prompts per generate call')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, required=True, help='the JSON lines file to write')
    args = parser.parse_args(argv)
    for name in ('n_prompts', 'n', 'max_new_tokens', 'max_prompt_length', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")}={getattr(args, name)} must be a positive integer')
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f'--temperature={args.temperature} must be >= 0 and --top-p={args.top_p} in (0, 1]')
    try:
        prompts = load_prompts(args.datasets, args.split, args.n_prompts, load_tokenizer_of(args.model))
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    loaded = load_model(args.model)
    samples = generate(loaded, encode_prompts(loaded.tokenizer, prompts, args.max_prompt_length), args.n,
                       args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size)
    write_jsonl(args.out, sample_rows(prompts, samples, temperature=args.temperature, seed=args.seed))
    print(f'{args.out}: {sum(map(len, samples))} samples of {len(prompts)} prompts', file=sys.stderr)


if __name__ == '__main__':
    main()


if __name__ == '__main__':
    main()
