"""Training-step throughput and peak memory: our SFT / DPO / β-DPO steps side by side with TRL's DPOTrainer.

    make bench                                   # creates .venv-bench (TRL) on first use, writes benchmarks/results.md
    .venv/bin/python benchmarks/bench_step.py --trl-python .venv-bench/bin/python --out benchmarks/results.md
    python benchmarks/bench_step.py --models pythia14m-shape --steps 6 --repeats 2 --trl-python .venv-bench/bin/python
    # SmolLM2-135M-Instruct (real weights) on real HH rows, full and LoRA (r = 16), against TRL full and with peft
    python benchmarks/bench_step.py --models smollm2 --data hh --lora 16 --no-sft --no-precomputed \
        --max-length 128 --steps 4 --repeats 1 --trl-python .venv-bench/bin/python

The script builds its own fixtures under --workdir: two GPT-NeoX models with random weights saved with
`save_pretrained` (tiny: hidden 64, 2 layers; pythia14m-shape: hidden 128, 6 layers, 4 heads, vocabulary
50,304, the size of EleutherAI/pythia-14m) with a byte-level tokenizer, and 256 + 16 preference pairs whose
prompts and responses are 64 bytes (= tokens) each. Every measurement runs in a fresh child process, so its
peak resident set size (getrusage ru_maxrss, model loading and any reference precompute pass included) is its
own; ours under this interpreter, TRL's under --trl-python, both with the same environment (MALLOC_* or LD_PRELOAD,
if the caller sets them, reach both children); our children also set glibc's mmap threshold in-process from the
config's cpu_malloc_mmap_threshold (train.build_run_models; --variant '...|cpu_malloc_mmap_threshold=null' for
glibc's dynamic one), TRL's keep glibc's defaults. --variant 'LABEL|KEY=VALUE ...' adds our rows with those
overrides; --profile DIR profiles our timed steps (benchmarks/profile_scopes.py); each row prints the padding share
of the positions the step computes. Steps are timed
after the first (excluded) and pairs/s is batch_size × timed steps / their total time; each configuration runs
--repeats times, interleaved, and the table keeps the fastest run (the machine may be shared); its peak RSS
column is that run's, or an earlier (slower) run's when that was lower.

--models also takes `smollm2` (SmolLM2-135M-Instruct through the project's own setup path, models.materialize_model:
the Hub where it answers, else its GGUF copy from `make smollm2`, converted once) or any Hugging Face model
directory; --data hh takes the first 256 + 16 rows of the real HH harmless-base slice (../shared/data/hh-rlhf)
that fit --max-length tokens of the model untruncated (prompt: at most half), split at the last "\n\nAssistant:"
into prompt, chosen and rejected, in HH text format (no chat template), the same rows for both implementations. --lora R adds LoRA rows (rank R, α = 2R, the
attention and MLP projections that lora.py adapts by default): ours (lora.r=R, the reference = the policy with
its adapters off) and TRL's DPOTrainer with the same peft LoraConfig (its reference is the same: ref_model=None).

FLOPs: the step's matmul FLOPs are estimated as 6·N·T for the policy (forward + backward; 4·N·T with LoRA, whose
backward pass computes no gradient of the base weights) plus 2·N·T for a reference forward run in the step, with N the parameters that take part in matmuls (all but the input
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


HH_SLICE = REPO.parent / 'shared' / 'data' / 'hh-rlhf' / 'harmless-base-test.jsonl.gz'
BLOCKS = {'gpt_neox': 'GPTNeoXLayer', 'llama': 'LlamaDecoderLayer'}


def hh_pairs(n: int, model_dir: Path, max_length: int) -> list:
    """The first n rows of the real HH slice whose chosen and rejected share the prompt before the last Assistant
    turn and fit without truncation (prompt ≤ max_length / 2 tokens, prompt + response + EOS ≤ max_length, with
    the model's tokenizer), as {prompt, chosen, rejected} (HH text format, as preference_datasets splits them).
    Both implementations then train on every token of the same pairs (TRL drops pairs whose prompt fills
    max_length, and truncates otherwise differently from ours)."""
    import gzip
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = lambda text: len(tokenizer(text, add_special_tokens=False)['input_ids'])
    pairs = []
    with gzip.open(HH_SLICE, 'rt') as f:
        for line in f:
            row = json.loads(line)
            cut = row['chosen'].rfind(ASSISTANT) + len(ASSISTANT)
            prompt = row['chosen'][:cut]
            if cut < len(ASSISTANT) or not row['rejected'].startswith(prompt) or length(prompt) > max_length // 2 \
                    or max(length(row[key]) for key in ('chosen', 'rejected')) + 1 > max_length:
                continue
            pairs.append({'prompt': prompt, 'chosen': row['chosen'][cut:], 'rejected': row['rejected'][cut:]})
            if len(pairs) == n:
                return pairs
    raise ValueError(f'{HH_SLICE} has fewer than {n} usable rows')


def resolve_model(name: str, paths: dict, workdir: Path) -> Path:
    """A fixture's directory, SmolLM2's (the project's own setup path), or a Hugging Face directory as given."""
    if name in paths:
        return paths[name]
    if name == 'smollm2':
        sys.path.insert(0, str(REPO))
        from models import materialize_model
        return Path(materialize_model('HuggingFaceTB/SmolLM2-135M-Instruct', workdir))
    if not (Path(name) / 'config.json').is_file():
        raise ValueError(f'--models {name}: not one of {", ".join(MODELS)}, smollm2, or a Hugging Face model directory')
    return Path(name)


def build_fixtures(workdir: Path) -> dict:
    """The generated model directories and the data directories, data (generated) and data-hh (real HH rows)
    (train.jsonl, test.jsonl); built once."""
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


def hh_data(workdir: Path, model: str, model_dir: Path, max_length: int) -> Path:
    """A data directory (train.jsonl: 256 pairs, test.jsonl: 16) of real HH rows that fit `max_length` tokens of
    `model`; built once."""
    if not HH_SLICE.is_file():
        raise SystemExit(f'--data hh needs the real HH slice {HH_SLICE}, which is absent')
    data = workdir / f'data-hh-{Path(model).name}-{max_length}'
    if not (data / 'train.jsonl').exists():
        data.mkdir(parents=True, exist_ok=True)
        pairs = hh_pairs(256 + 16, model_dir, max_length)
        for split, rows in (('train', pairs[:256]), ('test', pairs[256:])):
            (data / f'{split}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return data


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
    """Parameters that take part in matmuls: all but the input embedding (a lookup), unless the head shares it."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    embedding = model.get_input_embeddings().weight
    # parameters() counts a weight tied between the embedding and the head once: as the head's matmul then
    tied = model.get_output_embeddings().weight is embedding
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())


# ----- children ---------------------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ours(args) -> dict:
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir
    import train
    from trainers import BasicTrainer
    from transformers import AutoConfig
    block = BLOCKS[AutoConfig.from_pretrained(args.model_dir).model_type]
    overrides = [f'model.name_or_path={args.model_dir}', 'model.name=bench', f'model.block_name={block}',
                 f'datasets=[{args.data_dir}]', f'local_dirs=[{args.scratch}]', f'batch_size={args.batch_size}',
                 f'eval_batch_size={args.batch_size}', f'max_length={args.max_length}',
                 f'max_prompt_length={args.max_length // 2}', f'n_eval_examples={args.batch_size}',
                 f'n_examples={args.batch_size * args.steps}', 'debug=true',
                 f'activation_checkpointing={str(args.activation_checkpointing).lower()}',
                 'wandb.enabled=false', 'sample_during_eval=false', 'optimizer=AdamW', 'lr=1e-5', 'warmup_steps=0',
                 'model.policy_dtype=float32', 'model.reference_dtype=float32', *args.overrides]
    with initialize_config_dir(config_dir=str(REPO / 'config'), version_base=None):
        config = compose(config_name='config', overrides=overrides)
    parallelism = train.prepare_run(config)
    policy, reference = train.build_run_models(config, parallelism)
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    del policy, reference  # the trainer holds the only references (precompute frees the reference model)
    trainer.start()  # optimizer, seeds, and the reference pass when precompute_ref_log_probs=true
    times, tokens, padded = [], [], []
    profiler = None
    if args.profile:
        import torch.profiler
        from profile_scopes import module_scopes, reference_scope
        module_scopes(trainer.policy)
        reference_scope(trainer.reference)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    for batch in trainer.train_batches():
        if profiler is not None and len(times) == 1:  # the first step (allocations, lazy inits) left out, as timed
            profiler.start()
        start = time.perf_counter()
        trainer.train_step(batch)
        times.append(time.perf_counter() - start)
        tokens.append(sum(int(batch[k].sum()) for k in ('chosen_attention_mask', 'rejected_attention_mask')
                          if k in batch))
        # positions the concatenated forward runs: 2 · batch × the longer of the two halves
        padded.append(2 * len(batch['prompt']) * max(batch['chosen_input_ids'].shape[1],
                                                      batch['rejected_input_ids'].shape[1])
                      if 'rejected_input_ids' in batch else batch['chosen_input_ids'].numel())
    if profiler is not None:
        profiler.stop()
        write_profile(profiler, Path(args.profile), times[1:])
    return {'padded_tokens': padded, 'times': times, 'tokens': tokens, 'peak_rss_mib': peak_rss_mib(),
            'reference_in_step': trainer.reference.model is not None, 'lora': trainer.lora}


def write_profile(profiler, out: Path, times: list) -> None:
    """The profiler's operator table (self CPU time, shapes grouped) and where the profiled steps' time went
    (profile_scopes.breakdown, µs over all profiled steps, with their wall time), under `out`."""
    from profile_scopes import breakdown
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.scopes.json').write_text(json.dumps({'wall_us': 1e6 * sum(times), 'steps': len(times),
                                                           'breakdown': breakdown(profiler.events())}, indent=1))
    averages = profiler.key_averages(group_by_input_shape=True)
    out.with_suffix('.txt').write_text(averages.table(sort_by='self_cpu_time_total', row_limit=200, max_name_column_width=60, max_shapes_column_width=80))
    rows = [{'name': e.key, 'shapes': str(e.input_shapes), 'self_us': e.self_cpu_time_total, 'total_us': e.cpu_time_total,
             'count': e.count} for e in averages]
    out.with_suffix('.ops.json').write_text(json.dumps(rows))


def lora_rank(overrides) -> int:
    """R of a 'lora.r=R' override (0 if none)."""
    return next((int(o.split('=', 1)[1]) for o in overrides if o.startswith('lora.r=')), 0)


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
    rows = [json.loads(line) for line in (Path(args.data_dir) / 'train.jsonl').read_text().splitlines()]
    dataset = Dataset.from_list(rows[:args.batch_size * args.steps])
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    rank = lora_rank(args.overrides)
    peft_config = None
    if rank:  # TRL's peft path: its reference is the policy with the adapters disabled, as ours
        sys.path.insert(0, str(REPO))
        from peft import LoraConfig
        from lora import default_target_modules
        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM',
                                 target_modules=default_target_modules(model))
    reference = None if rank else AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    precompute = 'precompute_ref_log_probs=true' in args.overrides
    config = DPOConfig(output_dir=str(args.scratch), per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length,
                       learning_rate=1e-5, max_steps=args.steps, logging_steps=10_000, save_strategy='no',
                       report_to=[], gradient_checkpointing=args.activation_checkpointing, bf16=False, fp16=False,
                       use_cpu=True,
                       dataloader_num_workers=0, disable_dropout=True, optim='adamw_torch',
                       lr_scheduler_type='constant', precompute_ref_log_probs=precompute, seed=0)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    del model, reference
    tokens = []
    for batch in trainer.get_train_dataloader():
        tokens.append(int(batch['attention_mask'].sum()))
    trainer.train()
    return {'times': timer.times, 'tokens': tokens[:len(timer.times)], 'peak_rss_mib': peak_rss_mib(),
            'reference_in_step': not precompute, 'lora': bool(rank)}


# ----- the parent -------------------------------------------------------------------------------------------

def run_child(python: str, impl: str, model_dir: Path, data: Path, overrides, workdir: Path, args) -> dict:
    scratch = Path(tempfile.mkdtemp(dir=workdir, prefix='run-'))
    try:
        command = [python, __file__, '--child', impl, '--model-dir', str(model_dir), '--data-dir', str(data),
                   '--steps', str(args.steps), '--batch-size', str(args.batch_size), '--max-length',
                   str(args.max_length), '--scratch', str(scratch),
                   *(['--activation-checkpointing'] if args.activation_checkpointing else []),
                   *(['--profile', str(Path(args.profile).absolute() / slug(model_dir.name, impl, overrides))]
                     if args.profile and impl == 'ours' else []), '--', *overrides]
        env = dict(os.environ, TOKENIZERS_PARALLELISM='false', WANDB_MODE='disabled', HF_HUB_OFFLINE='1',
                   PYTHONWARNINGS='ignore')
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(scratch))
        if result.returncode != 0:
            raise RuntimeError(f'{impl} {overrides} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}')
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def slug(*parts) -> str:
    """A file name of a run's model, implementation and overrides."""
    text = '_'.join(p if isinstance(p, str) else '-'.join(p) for p in parts)
    return ''.join(c if c.isalnum() or c in '.-_' else '-' for c in text)[:150]


def summarise(run: dict, n_params: int, peak_gflops: float, batch_size: int) -> dict:
    times, tokens = run['times'][1:], run['tokens'][1:]
    step_time = sum(times) / len(times)
    flops = ((4 if run['lora'] else 6) + (2 if run['reference_in_step'] else 0)) * n_params * statistics.mean(tokens)
    return {'pairs_per_s': batch_size / step_time, 'tokens_per_s': statistics.mean(tokens) / step_time, 'step_s': step_time, 'peak_rss_mib': run['peak_rss_mib'],
            'gflop_per_step': flops / 1e9, 'peak_fraction': flops / step_time / 1e9 / peak_gflops,
            'tokens': statistics.mean(tokens), 'steps_timed': len(times), 'first_step_s': run['times'][0],
            'padding': 1 - sum(tokens) / sum(run['padded_tokens'][1:]) if 'padded_tokens' in run else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='tiny,pythia14m-shape')
    parser.add_argument('--steps', type=int, default=6, help='training steps per run; the first is not timed')
    parser.add_argument('--repeats', type=int, default=2, help='runs per configuration; the fastest is reported')
    parser.add_argument('--batch-size', type=int, default=8, help='pairs per step')
    parser.add_argument('--max-length', type=int, default=256, help='tokens of prompt + response (prompt: half)')
    parser.add_argument('--data', choices=['generated', 'hh'], default='generated',
                        help='generated 64 + 64-token pairs, or the first rows of the real HH slice')
    parser.add_argument('--lora', type=int, default=0, help='also LoRA rows of this rank (0: none)')
    parser.add_argument('--no-sft', action='store_true', help='leave out the SFT row')
    parser.add_argument('--modes', default='DPO,β-DPO', help='our preference steps to run (DPO, β-DPO)')
    parser.add_argument('--activation-checkpointing', action='store_true',
                        help="recompute activations in the backward pass (ours: activation_checkpointing=true, TRL: "
                             "gradient_checkpointing=True)")
    parser.add_argument('--no-precomputed', action='store_true', help='leave out the precomputed-reference rows')
    parser.add_argument('--trl-python', default=str(REPO / '.venv-bench' / 'bin' / 'python'),
                        help="interpreter of the environment with TRL installed (benchmarks/requirements-bench.txt)")
    parser.add_argument('--workdir', default=str(REPO / '.cache' / 'bench_step'))
    parser.add_argument('--out', default=None, help='write the Markdown table here too')
    parser.add_argument('--variant', action='append', default=[], metavar="'LABEL|KEY=VALUE ...'",
                        help="also run each of our rows with these config overrides, labelled LABEL (repeatable), "
                             "e.g. 'glibc dynamic mmap threshold|cpu_malloc_mmap_threshold=null'")
    parser.add_argument('--no-trl', action='store_true', help='leave out the TRL rows')
    parser.add_argument('--profile', default=None, metavar='DIR',
                        help="torch.profiler over our timed steps: DIR/<row>.txt (operator table) and .json (trace)")
    parser.add_argument('--child', choices=['ours', 'trl'], help=argparse.SUPPRESS)
    parser.add_argument('--model-dir', help=argparse.SUPPRESS)
    parser.add_argument('--data-dir', dest='data_dir', help=argparse.SUPPRESS)
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
    models = {name: resolve_model(name, paths, workdir) for name in args.models.split(',')}
    data = {name: hh_data(workdir, name, directory, args.max_length) if args.data == 'hh' else paths['data']
            for name, directory in models.items()}
    n_params = {name: matmul_params(directory) for name, directory in models.items()}
    best = {}
    for repeat in range(args.repeats):
        for model, mode, impl, python, overrides in configurations(models, args):
            child = 'trl' if impl.startswith('TRL') else 'ours'
            row = summarise(run_child(python, child, models[model], data[model], overrides, workdir, args), n_params[model],
                            peak, args.batch_size)
            key = (model, mode, impl)
            print(f'[{repeat + 1}/{args.repeats}] {model:16s} {mode:6s} {impl:40s} {row["pairs_per_s"]:7.2f} pairs/s '
                  f'{row["peak_rss_mib"]:7.0f} MiB {100 * row["peak_fraction"]:5.1f}% of matmul, '
                  f'first step {row["first_step_s"]:.0f} s'
                  + (f', padding {100 * row["padding"]:.0f}%' if row['padding'] is not None else ''), flush=True)
            if key not in best or row['pairs_per_s'] > best[key]['pairs_per_s']:
                best[key] = {**row, 'peak_rss_mib': min(row['peak_rss_mib'], best.get(key, row)['peak_rss_mib'])}
    table = render(best, peak, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def configurations(models: dict, args) -> list:
    """(model, step, implementation, interpreter, overrides) of every run, in the order they run."""
    runs = []
    lora = [f'lora.r={args.lora}', f'lora.alpha={2 * args.lora}']
    for model in models:
        for mode, overrides in OURS_MODES.items():
            if (mode == 'SFT' and args.no_sft) or (mode != 'SFT' and mode not in args.modes.split(',')):
                continue
            for label, extra in [('', []), *variants(args)]:
                runs.append((model, mode, 'ours' + label, sys.executable, [*overrides, *extra]))
                if mode != 'SFT' and not args.no_precomputed:
                    runs.append((model, mode, f'ours, precomputed reference{label}', sys.executable,
                                 [*overrides, 'precompute_ref_log_probs=true', *extra]))
                if mode != 'SFT' and args.lora:
                    runs.append((model, mode, f'ours, LoRA r={args.lora}{label}', sys.executable,
                                 [*overrides, *lora, *extra]))
        if args.no_trl:
            continue
        runs.append((model, 'DPO', 'TRL DPOTrainer', args.trl_python, []))
        if not args.no_precomputed:
            runs.append((model, 'DPO', 'TRL DPOTrainer, precomputed reference', args.trl_python,
                         ['precompute_ref_log_probs=true']))
        if args.lora:
            runs.append((model, 'DPO', f'TRL DPOTrainer, LoRA r={args.lora}', args.trl_python, lora))
    return runs


def variants(args) -> list:
    """(', LABEL', [overrides]) of every --variant."""
    out = []
    for spec in args.variant:
        label, _, overrides = spec.partition('|')
        out.append((f', {label}', overrides.split()))
    return out


def render(best: dict, peak: float, args) -> str:
    """The Markdown table. × TRL (tokens per second: the timed steps of two implementations may batch the pairs
    differently; with pairs of one length, the generated data, it is the pairs/s ratio) and ÷ TRL (peak memory)
    compare with TRL's DPO row of the same kind (LoRA rows with TRL's LoRA row); ÷ our DPO compares peak memory
    with our full-weight DPO step on the same model."""
    data = ('real HH harmless-base rows (HH text format; the first that fit max_length untruncated)'
            if args.data == 'hh' else 'generated 64 + 64-token pairs')
    checkpointing = 'activation checkpointing' if args.activation_checkpointing else 'no activation checkpointing'
    environment = ', '.join(f'{k}={v}' for k, v in os.environ.items() if k.startswith('MALLOC_'))
    allocator = (f'{environment} (environment)' if environment else
                 "glibc malloc: ours with the config's cpu_malloc_mmap_threshold (set in-process; default 131072) "
                 "unless a row says otherwise, TRL's with glibc's defaults")
    lines = [f'Batch {args.batch_size} pairs of {data}, max_length {args.max_length}, float32, AdamW, {checkpointing}, '
             f'{allocator}; {args.steps} steps per run, the first not timed; fastest of {args.repeats} runs. Machine: '
             f'{os.cpu_count()} CPU cores, float32 matmul {peak:.1f} GFLOP/s (2048³, best of 5).', '',
             '| model | step | implementation | pairs/s | tokens/s | × TRL | peak RSS (MiB) | ÷ TRL | ÷ our DPO | '
             'tokens/step | GFLOP/step | % of matmul peak |', '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for (model, mode, impl), row in best.items():
        lora = impl.split(', ')[-1] if 'LoRA' in impl else None
        trl = best.get((model, 'DPO', f'TRL DPOTrainer, {lora}' if lora else 'TRL DPOTrainer'))
        ours_dpo = best.get((model, 'DPO', 'ours'))
        compared = trl and mode != 'SFT'
        speed = f'{row["tokens_per_s"] / trl["tokens_per_s"]:.2f}' if compared else ''
        memory = f'{row["peak_rss_mib"] / trl["peak_rss_mib"]:.2f}' if compared else ''
        vs_ours = (f'{row["peak_rss_mib"] / ours_dpo["peak_rss_mib"]:.2f}'
                   if ours_dpo and impl.startswith('ours') and mode != 'SFT' else '')
        lines.append(f'| {model} | {mode} | {impl} | {row["pairs_per_s"]:.2f} | {row["tokens_per_s"]:.1f} | {speed} | '
                     f'{row["peak_rss_mib"]:.0f} | '
                     f'{memory} | {vs_ours} | {row["tokens"]:.0f} | {row["gflop_per_step"]:.1f} | '
                     f'{100 * row["peak_fraction"]:.1f} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
