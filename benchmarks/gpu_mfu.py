"""Model FLOPs utilisation of a DPO step on a CUDA GPU: a Pythia-1.4B-shaped model (random weights) through train.py.

    python benchmarks/gpu_mfu.py --out /tmp/mfu                      # BasicTrainer and FSDPTrainer, bfloat16
    python benchmarks/gpu_mfu.py --out /tmp/mfu --peak-tflops 989    # a GPU the table below does not name
    python benchmarks/gpu_mfu.py --out /tmp/mfu-cpu --cpu            # the script itself on CPU, a small shape

The model has EleutherAI/pythia-1.4b's shape (GPT-NeoX, hidden 2048, 24 layers, 16 heads, MLP 8192, vocabulary 50,304,
rotary on a quarter of each head, parallel residual) and random weights, saved once with `save_pretrained` beside a
byte-level tokenizer; the pairs are generated: a 256-byte prompt and two 256-byte responses (max_length 512, no
padding, so every token computed is counted). Each trainer runs `python train.py loss=dpo ...` for --steps steps of
--batch-size pairs, logging every step; a step's time is batch_size / examples_per_second of metrics.jsonl (train_step
times the step, whose loss and gradient-norm reads wait for the GPU), the first --warmup steps left out.

Model FLOPs per step (Kaplan et al. 2020, §2.1; the PaLM paper's MFU, Chowdhery et al. 2022, App. B): 6·N·T for the
policy's forward and backward and 2·N·T for the reference's forward, N the parameters of the blocks' matmuls (neither
embedding nor head), T the tokens of the step's chosen and rejected sequences; the head (vocabulary × hidden) counts on
the positions it projects, the RESPONSE labelled tokens of each sequence (logps.py projects no other); attention's
score and value products add 2 · 2 · layers · hidden · sequence length per token and pass (causal masking not
discounted, as PaLM's). MFU is that divided by the step time, the GPUs the trainer uses (BasicTrainer: 1, pinned with
CUDA_VISIBLE_DEVICES=0; FSDPTrainer: every visible GPU) and the dense bfloat16 peak of one.

--memory also runs one BasicTrainer β-DPO run in this process and compares torch.cuda.max_memory_allocated with
benchmarks/estimate_memory.py's estimate for the same overrides. Each run's checkpoints and export are deleted once its
metrics are read (a 1.4B run writes about 25 GB).
"""
import argparse
import json
import math
import os
import random
import string
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

PYTHIA_1_4B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192,
                   vocab_size=50304, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048)
# --cpu: checks the script (build, both trainers, the accounting) without a GPU; its MFU means nothing
SMALL = dict(PYTHIA_1_4B, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
# Dense bfloat16 peak of the tensor cores, TFLOP/s, from the vendors' data sheets (SXM forms; no sparsity)
PEAK_TFLOPS = {'H200': 989.4, 'H100 PCIe': 756.0, 'H100': 989.4, 'A100': 312.0, 'L40S': 362.1, 'L4': 121.0,
               'A10G': 70.0, 'A10': 125.0, 'RTX 4090': 165.2, 'V100': 125.0}
PROMPT, RESPONSE = 256, 256  # bytes, hence tokens of the byte-level tokenizer
HUMAN, ASSISTANT = '\n\nHuman: ', '\n\nAssistant:'


def build(out: Path, shape: dict) -> tuple:
    """(model directory, data directory), built once."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from models import build_byte_tokenizer
    model_dir, data_dir = out / f'gpt-neox-{shape["hidden_size"]}x{shape["num_hidden_layers"]}', out / 'data'
    if not (model_dir / 'config.json').exists():
        tokenizer = build_byte_tokenizer()
        config = GPTNeoXConfig(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, attention_dropout=0.0,
                               hidden_dropout=0.0, **shape)
        torch.manual_seed(0)
        GPTNeoXForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not (data_dir / 'train.jsonl').exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        text = lambda n: ''.join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
        # HH form (the generic loader keeps such a prompt as it is); a response and its EOS make RESPONSE tokens
        prompt = lambda: HUMAN + text(PROMPT - len(HUMAN) - len(ASSISTANT)) + ASSISTANT  # noqa: E731
        for split, n in (('train', 512), ('test', 16)):
            rows = [{'prompt': prompt(), 'chosen': ' ' + text(RESPONSE - 2), 'rejected': ' ' + text(RESPONSE - 2)}
                    for _ in range(n)]
            (data_dir / f'{split}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return model_dir, data_dir


def matmul_params(model_dir: Path) -> tuple:
    """(parameters of the blocks' matmuls, parameters of the head)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with __import__('torch').device('meta'):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    head = model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel() - head, head


def peak_tflops(name: str) -> float:
    for key, value in PEAK_TFLOPS.items():  # 'H100 PCIe' before 'H100'
        if key in name:
            return value
    raise SystemExit(f'no bfloat16 peak known for {name!r}: pass --peak-tflops')


def overrides_for(trainer: str, model_dir: Path, data_dir: Path, out: Path, args) -> list:
    """train.py's overrides of one measured run."""
    return [
        'loss=dpo', 'loss.beta=0.1', 'model=blank_model', f'model.name_or_path={model_dir}', 'model.name=pythia14b_shape',
        'model.block_name=GPTNeoXLayer', 'model.reference_dtype=bfloat16', f'trainer={trainer}',
        f'datasets=[{data_dir}]', f'batch_size={args.batch_size}', f'eval_batch_size={args.batch_size}',
        f'n_examples={args.batch_size * args.steps}', f'n_eval_examples={args.batch_size}', 'do_first_eval=false',
        'eval_every=1_000_000', f'max_length={PROMPT + RESPONSE}', f'max_prompt_length={PROMPT}', 'optimizer=AdamW',
        'lr=1e-6', 'warmup_steps=0', 'minimum_log_interval_secs=0', 'sample_during_eval=false', 'wandb.enabled=false',
        f'local_dirs=[{out}]', f'exp_name=mfu_{trainer}',
        *(['model.fsdp_policy_mp=bfloat16'] if trainer == 'FSDPTrainer' else ['policy_autocast=bfloat16'])]


def run(trainer: str, model_dir: Path, data_dir: Path, out: Path, args) -> Path:
    """One train.py run (BasicTrainer on the first GPU only); its run directory."""
    overrides = overrides_for(trainer, model_dir, data_dir, out, args)
    env = dict(os.environ, WANDB_MODE='disabled', HF_HUB_OFFLINE='1')
    if trainer == 'BasicTrainer' and not args.cpu:
        env['CUDA_VISIBLE_DEVICES'] = env.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]
    result = subprocess.run([sys.executable, str(REPO / 'train.py'), *overrides], cwd=REPO, capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f'train.py {" ".join(overrides)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return next(Path(line[len('Writing to '):].strip()) for line in result.stdout.splitlines() if line.startswith('Writing to '))


def drop_weights(run_dir: Path) -> None:
    """The run's checkpoints and export, deleted (the disk of a lent machine is small); metrics.jsonl stays."""
    import shutil
    for path in [*run_dir.glob('step-*'), run_dir / 'hf_model', run_dir / 'LATEST']:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


def measure(run_dir: Path, n_params: tuple, peak: float, shape: dict, args, n_gpus: int) -> dict:
    drop_weights(run_dir)
    steps = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    steps = [m for m in steps if m['split'] == 'train']
    times = [args.batch_size / m['examples_per_second'] for m in steps[args.warmup:]]
    losses = [m['loss/train'] for m in steps]
    sequence = PROMPT + RESPONSE
    tokens = 2 * args.batch_size * sequence  # chosen and rejected sequences
    labelled = 2 * args.batch_size * (RESPONSE - 1)  # the positions the head projects (each response's labels)
    attention = 2 * 2 * shape['num_hidden_layers'] * shape['hidden_size'] * sequence  # per token and pass
    blocks, head = n_params
    flops = (6 + 2) * blocks * tokens + (6 + 2) * head * labelled + (3 + 1) * attention * tokens
    step_s = sorted(times)[len(times) // 2]
    return {'run_dir': str(run_dir), 'losses': losses, 'median_step_s': step_s, 'pairs_per_s': args.batch_size / step_s,
            'tflop_per_step': flops / 1e12, 'gpus': n_gpus, 'mfu': flops / step_s / (n_gpus * peak * 1e12),
            'finite': all(math.isfinite(x) for x in losses)}


def memory_check(model_dir: Path, data_dir: Path, out: Path, args) -> dict:
    """One BasicTrainer run in this process: torch.cuda.max_memory_allocated against estimate_memory's estimate."""
    import torch
    import estimate_memory
    import train
    overrides = [*overrides_for('BasicTrainer', model_dir, data_dir, out, args), 'exp_name=memory_check']
    config = estimate_memory.compose_config(overrides)
    estimate = estimate_memory.estimate(estimate_memory.compose_config(overrides), n_gpus=1, gpu_memory_gib=80)
    if args.cpu:
        return {'estimate_gib': estimate['peak_gib_per_gpu'], 'measured_gib': None}
    torch.cuda.reset_peak_memory_stats()
    parallelism = train.prepare_run(config)
    train.run_trainer(config, parallelism, *train.build_run_models(config, parallelism))
    drop_weights(Path(config.local_run_dir))
    measured = torch.cuda.max_memory_allocated() / 2 ** 30
    return {'estimate_gib': estimate['peak_gib_per_gpu'], 'measured_gib': round(measured, 3),
            'ratio': round(estimate['peak_gib_per_gpu'] / measured, 3), 'parts_gib': estimate['parts_gib']}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--out', type=Path, required=True, help='where the model, data and runs go (about 6 GB)')
    parser.add_argument('--batch-size', type=int, default=16, help='pairs per step')
    parser.add_argument('--steps', type=int, default=12)
    parser.add_argument('--warmup', type=int, default=2, help='first steps left out of the timing')
    parser.add_argument('--peak-tflops', type=float, default=None, help="the GPU's dense bfloat16 peak (default: by name)")
    parser.add_argument('--trainers', nargs='+', default=['BasicTrainer', 'FSDPTrainer'])
    parser.add_argument('--memory', action='store_true', help='also compare the memory estimate with the measured peak')
    parser.add_argument('--cpu', action='store_true', help='a small shape on CPU, 3 steps of 2 pairs (2 gloo processes for FSDP), '
                                                           'to check this script; the MFU then means nothing')
    args = parser.parse_args()
    import torch
    if not (args.cpu or torch.cuda.is_available()):
        raise SystemExit('gpu_mfu.py measures a CUDA GPU; none is visible here (--cpu checks the script on CPU)')
    name = 'CPU' if args.cpu else torch.cuda.get_device_name(0)
    peak = args.peak_tflops or (1.0 if args.cpu else peak_tflops(name))
    shape = SMALL if args.cpu else PYTHIA_1_4B
    if args.cpu:  # a check of the script, not a measurement: 3 steps of 2 pairs
        args.batch_size, args.steps, args.warmup = 2, 3, 1
    out = args.out.resolve()
    model_dir, data_dir = build(out, shape)
    n_params = matmul_params(model_dir)
    print(f'{name}: dense bfloat16 peak {peak} TFLOP/s; model {n_params[0] / 1e9:.3f}B block matmul parameters, '
          f'head {n_params[1] / 1e6:.0f}M', flush=True)
    results = {}
    for trainer in args.trainers:
        n_gpus = 1 if args.cpu or trainer == 'BasicTrainer' else torch.cuda.device_count()
        results[trainer] = measure(run(trainer, model_dir, data_dir, out, args), n_params, peak, shape, args, n_gpus)
        r = results[trainer]
        print(f'{trainer}: {r["median_step_s"] * 1000:.0f} ms per step of {args.batch_size} pairs '
              f'({r["pairs_per_s"]:.1f} pairs/s), {r["tflop_per_step"]:.1f} TFLOP per step, MFU {100 * r["mfu"]:.1f}%; '
              f'losses {[round(x, 4) for x in r["losses"]]}', flush=True)
    memory = memory_check(model_dir, data_dir, out, args) if args.memory else None
    if memory:
        print(f'memory: estimated {memory["estimate_gib"]} GiB, measured {memory["measured_gib"]} GiB', flush=True)
    (out / 'mfu.json').write_text(json.dumps({'gpu': name, 'peak_tflops': peak, 'n_params': n_params,
                                              'batch_size': args.batch_size, 'results': results, 'memory': memory},
                                             indent=1))
    # No ln 2 check here: under BasicTrainer the policy computes under autocast and the bfloat16 reference without
    # it, so their first log-probabilities differ slightly (gpu_check.sh checks ln 2 with matching precisions).
    if not all(r['finite'] for r in results.values()):
        raise SystemExit('a loss was not finite: see mfu.json')


if __name__ == '__main__':
    main()
