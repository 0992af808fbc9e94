"""On-policy preference pairs for the synthetic task: the gold answer against the model's own mistakes.

    python sample_pairs.py RUN_DIR --out pairs.jsonl           # RUN_DIR: a run on datasets=[synthetic]
    python train.py loss=dpo datasets=[synthetic] synthetic.train_pairs=pairs.jsonl \\
        model.archive=RUN_DIR/LATEST/policy.pt ...

The model of RUN_DIR (its config.yaml and LATEST/policy.pt) answers the task's training prompts once greedily
and `--samples` times at `--temperature`. Each prompt it gets wrong at least once gives one pair: the gold
answer (chosen) against its greedy answer if that is wrong, else against one of its wrong samples; prompts it
always answers right give none. A fraction `--flip-fraction` of the pairs is flipped (label noise, as in the
code-drawn pairs), and the rejected answers are whatever mistakes the model makes: near misses one edit away
(low reward gap) mixed with answers further off (high gap).

Why: the code-drawn pairs of datasets=[synthetic] contrast the gold answer with mistakes the SFT model rarely
makes, and DPO on them barely moved its greedy answers; preference training moves a model where its own samples
are pushed down ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data", Tajwar et al., ICML
2024). On these pairs DPO and β-DPO raise gold accuracy, though SFT continued on the gold answers raises it more
(README, "The demo"). Sampling is seeded: the same run directory and options give the same file.

Each row is {"prompt", "chosen", "rejected"} (the generic preference format, HH-style strings, responses with
their leading space) plus "greedy_correct" and "flipped" for inspection; the file is written atomically.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from checkpoints import atomic_write_text, load_checkpoint_file, load_state_dict_checked
from synthetic_task import edit_distance, synthetic_gold_answer, synthetic_options, synthetic_prompts

# the longest gold answer is 13 bytes ('double' of 6 letters, with its leading space): room for a few more
MAX_NEW_TOKENS = 16


def load_run_policy(run_dir: Path):
    """(policy in eval mode, tokenizer, run config) of RUN_DIR's LATEST checkpoint."""
    from models import build_model, load_tokenizer
    config_path = run_dir / 'config.yaml'
    if not config_path.is_file():
        raise FileNotFoundError(f'{run_dir}: no config.yaml; pass a run directory written by train.py')
    config = OmegaConf.load(config_path)
    if 'synthetic' not in config.datasets:
        raise ValueError(f'{run_dir} trained on datasets={list(config.datasets)}; on-policy pairs are made for '
                         f'the synthetic task only (a run with datasets=[synthetic])')
    policy = build_model(config, 'float32', None)
    checkpoint = run_dir / 'LATEST' / 'policy.pt'
    load_state_dict_checked(policy, load_checkpoint_file(checkpoint, 'policy checkpoint')['state'], str(checkpoint))
    if torch.cuda.is_available():
        policy.to('cuda')
    return policy.eval(), load_tokenizer(config), config


@torch.no_grad()
def answer(policy, tokenizer, prompts: Sequence[str], n: int, temperature: Optional[float]) -> List[List[str]]:
    """n answers per prompt (the text after the prompt, EOS and anything after it removed): greedy if
    temperature is None, else sampled at that temperature."""
    tokenizer.padding_side = 'left'
    inputs = tokenizer(list(prompts), return_tensors='pt', padding=True).to(policy.device)
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    output = policy.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=n,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    texts = tokenizer.batch_decode(output[:, inputs['input_ids'].shape[1]:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def make_pair(prompt: str, greedy: str, samples: Sequence[str], rng: random.Random, flip_fraction: float) -> Optional[Dict]:
    """The row of one prompt (see the module docstring), or None when every answer is right."""
    gold = ' ' + synthetic_gold_answer(prompt)
    wrong = [s for s in samples if s.strip() != gold.strip()]
    greedy_correct = greedy.strip() == gold.strip()
    if greedy_correct and not wrong:
        return None
    rejected = greedy if not greedy_correct else rng.choice(wrong)
    flipped = rng.random() < flip_fraction
    chosen, rejected = (rejected, gold) if flipped else (gold, rejected)
    return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected, 'greedy_correct': greedy_correct,
            'flipped': flipped}


def describe(rows: Sequence[Dict], n_prompts: int) -> str:
    n = max(1, len(rows))
    near = sum(edit_distance(r['chosen'].strip(), r['rejected'].strip()) == 1 for r in rows)
    greedy_wrong = sum(not r['greedy_correct'] for r in rows)
    return (f'{len(rows)} pairs from {n_prompts} prompts (greedy answer wrong on {greedy_wrong}, '
            f'{100 * greedy_wrong / max(1, n_prompts):.1f}%); {100 * near / n:.1f}% near misses (one edit), '
            f'{100 * sum(r["flipped"] for r in rows) / n:.1f}% flipped')


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('run_dir', type=Path, help='a run directory of train.py on datasets=[synthetic]')
    parser.add_argument('--out', type=Path, required=True, help='the JSON lines file to write')
    parser.add_argument('--n-prompts', type=int, default=None,
                        help="training prompts to answer (the first N of the run's; default: all of them)")
    parser.add_argument('--samples', type=int, default=4, help='sampled answers per prompt besides the greedy one')
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--flip-fraction', type=float, default=None,
                        help="fraction of pairs flipped (default: the run's synthetic.flip_fraction)")
    parser.add_argument('--batch-size', type=int, default=256, help='prompts per generate call')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_prompts is not None and args.n_prompts < 1:
        parser.error(f'--n-prompts={args.n_prompts} must be a positive integer')
    if args.samples < 0 or args.batch_size < 1:
        parser.error(f'--samples={args.samples} must be 0 or more and --batch-size={args.batch_size} positive')
    if not args.temperature > 0:
        parser.error(f'--temperature={args.temperature} must be positive')
    if args.flip_fraction is not None and not 0 <= args.flip_fraction <= 1:
        parser.error(f'--flip-fraction={args.flip_fraction} must be in [0, 1]')

    policy, tokenizer, config = load_run_policy(args.run_dir)
    options = synthetic_options(OmegaConf.to_container(config.synthetic, resolve=True))
    flip_fraction = options['flip_fraction'] if args.flip_fraction is None else args.flip_fraction
    prompts = synthetic_prompts(options['n_test'] + options['n_train'])[options['n_test']:][:args.n_prompts]
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    rows, start = [], time.time()
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        greedy = answer(policy, tokenizer, batch, 1, None)
        samples = answer(policy, tokenizer, batch, args.samples, args.temperature) if args.samples else [[]] * len(batch)
        rows.extend(r for r in (make_pair(p, g[0], s, rng, flip_fraction) for p, g, s in zip(batch, greedy, samples))
                    if r is not None)
        print(f'\r{min(i + args.batch_size, len(prompts))}/{len(prompts)} prompts, {len(rows)} pairs, '
              f'{time.time() - start:.0f} s', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    atomic_write_text(args.out, ''.join(json.dumps(r) + '\n' for r in rows))
    print(f'{args.out}: {describe(rows, len(prompts))}')


if __name__ == '__main__':
    main()
