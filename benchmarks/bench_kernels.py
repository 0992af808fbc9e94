"""SmolLM2's DPO forward and backward passes under CPU kernel and thread settings, interleaved in one process.

    .venv/bin/python benchmarks/bench_kernels.py --model .cache/bench_step/gguf_models/<SmolLM2 dir> --rounds 3

One batch of the shape of bench_step.py's SmolLM2 rows (16 rows = 8 pairs, 107 positions, each row's real length drawn
from 40–107 and right-padded, labels on the second half of each row's tokens, random token ids), then per setting: the
policy's forward through logps.forward_logps and its backward pass, and the reference's no-grad forward (a second copy
of the model), the two parts of a step bench_step.py times that the settings touch. Settings: SDPA as transformers
calls it (PyTorch picks its CPU flash-attention kernel), SDPA with the math kernel forced
(torch.nn.attention.sdpa_kernel), transformers' eager attention (attn_implementation='eager'), and each at 1 thread
against 2 (torch.set_num_threads). The settings run in turn, `--rounds` times, so a shared machine's load falls on all
of them alike; each keeps its fastest round.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from logps import forward_logps  # noqa: E402


def batch(vocab: int, rows: int = 16, length: int = 107, seed: int = 0):
    """(input_ids, attention_mask, labels) of right-padded rows of 40..length real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    lengths = torch.randint(40, length + 1, (rows,), generator=generator)
    lengths[0] = length
    positions = torch.arange(length)
    mask = (positions[None] < lengths[:, None]).long()
    labels = torch.where((positions[None] >= lengths[:, None] // 2) & (mask == 1), ids, -100)
    return ids * mask, mask, labels


def timed_step(policy, reference, ids, mask, labels) -> tuple:
    """(policy forward + backward, reference forward) seconds."""
    start = time.perf_counter()
    forward_logps(policy, ids, mask, labels, 2048).sum().backward()
    middle = time.perf_counter()
    with torch.no_grad():
        forward_logps(reference, ids, mask, labels, 2048)
    policy.zero_grad(set_to_none=True)
    return middle - start, time.perf_counter() - middle


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='a Hugging Face model directory (SmolLM2)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', default='2,1', help='thread counts to compare')
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    policy, reference = load(), load().eval()
    ids, mask, labels = batch(policy.config.vocab_size)
    attention = {'sdpa (flash CPU kernel)': ('sdpa', contextlib.nullcontext),
                 'sdpa, math kernel forced': ('sdpa', lambda: sdpa_kernel(SDPBackend.MATH)),
                 'eager attention': ('eager', contextlib.nullcontext)}
    settings = [(name, threads) for threads in map(int, args.threads.split(',')) for name in attention]
    timed_step(policy, reference, ids, mask, labels)  # first call: allocations, lazy inits
    best = {}
    for round_ in range(args.rounds):
        for name, threads in settings:
            implementation, kernel = attention[name]
            torch.set_num_threads(threads)
            for model in (policy, reference):
                model.set_attn_implementation(implementation)
            with kernel():
                times = timed_step(policy, reference, ids, mask, labels)
            print(f'[{round_ + 1}/{args.rounds}] {name:26s} {threads} threads: policy fwd+bwd {times[0]:6.2f} s, '
                  f'reference fwd {times[1]:6.2f} s', flush=True)
            key = (name, threads)
            best[key] = min(best.get(key, times), times, key=sum)
    print(f'\n{mask.shape[0]} rows × {mask.shape[1]} positions ({int(mask.sum())} real), fastest of {args.rounds} rounds\n')
    print('| attention | threads | policy forward + backward (s) | reference forward (s) | sum (s) |')
    print('|---|---:|---:|---:|---:|')
    for (name, threads), (policy_s, reference_s) in best.items():
        print(f'| {name} | {threads} | {policy_s:.2f} | {reference_s:.2f} | {policy_s + reference_s:.2f} |')


if __name__ == '__main__':
    main()
