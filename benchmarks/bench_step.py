"""Training-step throughput and peak memory: our SFT / DPO / β-DPO steps side by side with TRL's DPOTrainer.

    make bench                                   # creates .venv-bench (TRL) on first use, writes benchmarks/results.md
    .venv/bin/python benchmarks/bench_step.py --trl-python .venv-bench/bin/python --out benchmarks/results.md
    python benchmarks/bench_step.py --models pythia14m-shape --steps 6 --repeats 2 --trl-python .venv-bench/bin/python

The script builds its own fixtures under --workdir: two GPT-NeoX models with random weights saved with
`save_pretrained` (tiny: hidden 64, 2 layers; pythia14m-shape: hidden 128, 6 layers, 4 heads, vocabulary
50,304, the size of EleutherAI/pythia-14m) with a byte-level tokenizer, and 256 + 16 preference pairs whose
prompts and responses are 64 bytes (= tokens) each. Every measurement runs in a fresh child process, so its
peak resident set size (getrusage ru_maxrss, model loading and any reference precompute pass included) is its
own; ours under this interpreter, TRL's under --trl-python, both with the same environment (glibc malloc with
its defaults unless the caller sets MALLOC_* or LD_PRELOAD, which both children inherit). Steps are timed
after the first (excluded) and pairs/s is batch_size × timed steps / their total time; each configuration runs
--repeats times, interleaved, and the table keeps the fastest run (the machine may be shared); its peak RSS
column is that run's, or an earlier (slower) run's when that was lower.

FLOPs: the step's matmul FLOPs are estimated as 6·N·T for the policy (forward + backward) plus 2·N·T for a
reference forward run in the step, with N the parameters that take part in matmuls (all but the input
embedding, which is a lookup) and T the non-padding tokens of the step (prompt + response, chosen and
rejected). The same formula is used for every row, so it counts the useful work of a full-vocabulary head on
every token whatever an implementation skips; attention scores are left out (sequences of 129 tokens).
The fraction is that rate over the best of several 2048³ float32 matmuls timed on the same machine.
"""
import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    'tiny': dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512),
    'pythia14m-shape': dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                            vocab_size=50304),
}
WORDS = ('alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec '
         'romeo sierra tango uniform victor whiskey xray yankee zulu').split()
HUMAN, ASSISTANT = '\n\nHuman: ', '\n\nAssistant:'
OURS_MODES = {
    'SFT': ['loss=sft'],
    'DPO': ['loss=dpo', 'loss.beta=0.1'],
    'β-DPO': ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6'],
}


# ----- fixtures ---------------------------------------------------------------------------------------------

def text_of_length(rng: random.Random, n: int) -> str:
    words = []
    while len(' '.join(words)) < n:
        words.append(rng.choice(WORDS))
    return ' '.join(words)[:n]


def pair(rng: random.Random) -> dict:
    """Prompt of 64 bytes in HH form (kept as it is by our loader), responses of 64 bytes starting with a space."""
    prompt = HUMAN + text_of_length(rng, 64 - len(HUMAN) - len(ASSISTANT)) + ASSISTANT
    return {'prompt': prompt, 'chosen': ' ' + text_of_length(rng, 63), 'rejected': ' ' + text_of_length(rng, 63)}


def build_fixtures(workdir: Path) -> dict:
    """The model directories and the data directory (train.jsonl, test.jsonl); built once."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from models import build_byte_tokenizer
    paths = {}
    tokenizer = build_byte_tokenizer()
    for name, sizes in MODELS.items():
        target = workdir / 'models' / name
        if not (target / 'config.json').exists():
            config = GPTNeoXConfig(max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                                   bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                                   attention_dropout=0.0, hidden_dropout=0.0, **sizes)
            torch.manual_seed(0)
            GPTNeoXForCausalLM(config).save_pretrained(target)
            tokenizer.save_pretrained(target)
        paths[name] = target
    data = workdir / 'data'
    if not (data / 'train.jsonl').exists():
        data.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for split, n in (('train', 256), ('test', 16)):
            (data / f'{split}.jsonl').write_text(''.join(json.dumps(pair(rng)) + '\n' for _ in range(n)))
    paths['data'] = data
    return paths


def matmul_gflops(repeats: int = 5, n: int = 2048) -> float:
    """Best float32 matmul rate of this machine (all threads), GFLOP/s."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def matmul_params(model_dir: Path) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# ----- children ---------------------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ours(args) -> dict:
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    import train
    from trainers import BasicTrainer
    overrides = [f'model.name_or_path={args.model_dir}', 'model.name=bench', f'datasets=[{args.data}]',
                 f'local_dirs=[{args.scratch}]', 'batch_size=8', 'eval_batch_size=8', 'max_length=256',
                 'max_prompt_length=128', 'n_eval_examples=8', f'n_examples={8 * args.steps}', 'debug=true',
                 'wandb.enabled=false', 'sample_during_eval=false', 'optimizer=AdamW', 'lr=1e-5', 'warmup_steps=0',
                 'model.policy_dtype=float32', 'model.reference_dtype=float32', *args.overrides]
    with initialize_config_dir(config_dir=str(REPO / 'config'), version_base=None):
        config = compose(config_name='config', overrides=overrides)
    parallelism = train.prepare_run(config)
    policy, reference = train.build_run_models(config, parallelism)
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    del policy, reference  # the trainer holds the only references (precompute frees the reference model)
    trainer.start()  # optimizer, seeds, and the reference pass when precompute_ref_log_probs=true
    times, tokens = [], []
    for batch in trainer.train_batches():
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
        tokens.append(sum(int(batch[k].sum()) for k in ('chosen_attention_mask', 'rejected_attention_mask') if k in batch))
    return {'times': times, 'tokens': tokens, 'peak_rss_mib': peak_rss_mib(),
            'reference_in_step': trainer.reference.model is not None}


def child_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    rows = [json.loads(line) for line in (Path(args.data) / 'train.jsonl').read_text().splitlines()]
    dataset = Dataset.from_list(rows[:8 * args.steps])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    precompute = 'precompute_ref_log_probs=true' in args.overrides
    config = DPOConfig(output_dir=str(args.scratch), per_device_train_batch_size=8, max_length=256,
                       learning_rate=1e-5, max_steps=args.steps, logging_steps=10_000, save_strategy='no',
                       report_to=[], gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                       dataloader_num_workers=0, disable_dropout=True, optim='adamw_torch',
                       lr_scheduler_type='constant', precompute_ref_log_probs=precompute, seed=0)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    del model, reference
    tokens = []
    for batch in trainer.get_train_dataloader():
        tokens.append(int(batch['attention_mask'].sum()))
    trainer.train()
    return {'times': timer.times, 'tokens': tokens[:len(timer.times)], 'peak_rss_mib': peak_rss_mib(),
            'reference_in_step': not precompute}


# ----- the parent -------------------------------------------------------------------------------------------

def run_child(python: str, impl: str, model_dir: Path, data: Path, steps: int, overrides, workdir: Path) -> dict:
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix='run-'))
    try:
        command = [python, __file__, '--child', impl, '--model-dir', str(model_dir), '--data', str(data),
                   '--steps', str(steps), '--scratch', str(scratch), '--', *overrides]
        env = dict(os.environ, TOKENIZERS_PARALLELISM='false', WANDB_MODE='disabled', HF_HUB_OFFLINE='1',
                   PYTHONWARNINGS='ignore')
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(scratch))
        if result.returncode != 0:
            raise RuntimeError(f'{impl} {overrides} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}')
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summarise(run: dict, n_params: int, peak_gflops: float) -> dict:
    times, tokens = run['times'][1:], run['tokens'][1:]
    step_time = sum(times) / len(times)
    flops = (6 + (2 if run['reference_in_step'] else 0)) * n_params * statistics.mean(tokens)
    return {'pairs_per_s': 8 / step_time, 'step_s': step_time, 'peak_rss_mib': run['peak_rss_mib'],
            'gflop_per_step': flops / 1e9, 'peak_fraction': flops / step_time / 1e9 / peak_gflops,
            'tokens': statistics.mean(tokens), 'steps_timed': len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='tiny,pythia14m-shape')
    parser.add_argument('--steps', type=int, default=6, help='training steps per run; the first is not timed')
    parser.add_argument('--repeats', type=int, default=2, help='runs per configuration; the fastest is reported')
    parser.add_argument('--trl-python', default=str(REPO / '.venv-bench' / 'bin' / 'python'),
                        help="interpreter of the environment with TRL installed (benchmarks/requirements-bench.txt)")
    parser.add_argument('--workdir', default=str(REPO / '.cache' / 'bench_step'))
    parser.add_argument('--out', default=None, help='write the Markdown table here too')
    parser.add_argument('--child', choices=['ours', 'trl'], help=argparse.SUPPRESS)
    parser.add_argument('--model-dir', help=argparse.SUPPRESS)
    parser.add_argument('--data', help=argparse.SUPPRESS)
    parser.add_argument('--scratch', help=argparse.SUPPRESS)
    parser.add_argument('overrides', nargs='*', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_ours if args.child == 'ours' else child_trl)(args)))
        return

    # absolute, not resolved: a venv's python is a symlink to the base interpreter
    args.trl_python = str(Path(args.trl_python).absolute())
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = build_fixtures(workdir)
    peak = matmul_gflops()
    print(f'float32 matmul (2048³, best of 5): {peak:.1f} GFLOP/s', flush=True)
    n_params = {model: matmul_params(paths[model]) for model in args.models.split(',')}
    configurations = []
    for model in args.models.split(','):
        for mode, overrides in OURS_MODES.items():
            configurations.append((model, mode, 'ours', sys.executable, overrides))
            if mode != 'SFT':
                configurations.append((model, mode, 'ours, precomputed reference', sys.executable,
                                       [*overrides, 'precompute_ref_log_probs=true']))
        configurations.append((model, 'DPO', 'TRL DPOTrainer', args.trl_python, []))
        configurations.append((model, 'DPO', 'TRL DPOTrainer, precomputed reference', args.trl_python,
                               ['precompute_ref_log_probs=true']))
    best = {}
    for repeat in range(args.repeats):
        for model, mode, impl, python, overrides in configurations:
            child = 'trl' if impl.startswith('TRL') else 'ours'
            row = summarise(run_child(python, child, paths[model], paths['data'], args.steps, overrides, workdir),
                            n_params[model], peak)
            key = (model, mode, impl)
            print(f'[{repeat + 1}/{args.repeats}] {model:16s} {mode:6s} {impl:40s} {row["pairs_per_s"]:7.2f} pairs/s '
                  f'{row["peak_rss_mib"]:7.0f} MiB', flush=True)
            if key not in best or row['pairs_per_s'] > best[key]['pairs_per_s']:
                best[key] = {**row, 'peak_rss_mib': min(row['peak_rss_mib'], best.get(key, row)['peak_rss_mib'])}
    table = render(best, peak, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def render(best: dict, peak: float, args) -> str:
    lines = [f'Batch 8 pairs, max_length 256, float32, AdamW, no gradient checkpointing; {args.steps} steps per run, '
             f'the first not timed; fastest of {args.repeats} runs. Machine: {os.cpu_count()} CPU cores, float32 '
             f'matmul {peak:.1f} GFLOP/s (2048³, best of 5).', '',
             '| model | step | implementation | pairs/s | × TRL | peak RSS (MiB) | ÷ TRL | tokens/step | GFLOP/step | '
             '% of matmul peak |', '|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for (model, mode, impl), row in best.items():
        trl = best.get((model, 'DPO', 'TRL DPOTrainer'))
        speed = f'{row["pairs_per_s"] / trl["pairs_per_s"]:.2f}' if trl and mode != 'SFT' else ''
        memory = f'{row["peak_rss_mib"] / trl["peak_rss_mib"]:.2f}' if trl and mode != 'SFT' else ''
        lines.append(f'| {model} | {mode} | {impl} | {row["pairs_per_s"]:.2f} | {speed} | {row["peak_rss_mib"]:.0f} | '
                     f'{memory} | {row["tokens"]:.0f} | {row["gflop_per_step"]:.1f} | {100 * row["peak_fraction"]:.1f} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
