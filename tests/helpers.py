"""Shared test helpers: compose the real Hydra config, build a trainer in-process, run train.py."""
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'

# Small, fast settings for the embedded tiny model on the synthetic task.
FAST = ['wandb.enabled=false', 'sample_during_eval=false', 'synthetic.n_train=64', 'synthetic.n_test=16',
        'synthetic.n_gold_eval=0', 'n_eval_examples=8', 'eval_batch_size=8', 'batch_size=8', 'warmup_steps=0']


def compose_config(overrides, tmp_path):
    """The config train.py would see for these command-line overrides, with caches under tmp_path."""
    import train
    train.register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / 'config'), version_base=None):
        config = compose(config_name='config', overrides=[f'local_dirs=[{tmp_path}]', *overrides])
    return config


TRAIN_ENV = dict(PYTHONUNBUFFERED='1', WANDB_MODE='disabled', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')


def run_train(args, cwd, timeout=600, check=True):
    """Run `python train.py ARGS` as a user would; returns the CompletedProcess (stdout + stderr)."""
    env = dict(os.environ, **TRAIN_ENV)
    result = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'train.py {" ".join(args)} failed with {result.returncode}:\n{result.stdout[-3000:]}\n'
                             f'{result.stderr[-5000:]}')
    return result


def run_dir_from_output(output: str) -> Path:
    """The run directory train.py announces ('Writing to /ABSOLUTE/DIR')."""
    for line in output.splitlines():
        if line.startswith('Writing to '):
            return Path(line[len('Writing to '):].strip())
    raise AssertionError('train.py did not print its run directory:\n' + output[-2000:])


def start_run(overrides, tmp_path):
    """What `python train.py OVERRIDES` does up to its first training batch, in this process: validate and
    write the run directory, build the models (archive / resume loaded), build the trainer (eval data
    loaded), set up the optimizer, restore a resume, draw the first batch. Returns the trainer."""
    import train
    import trainers
    config = compose_config(overrides, tmp_path)
    parallelism = train.prepare_run(config)
    policy, reference_model = train.build_run_models(config, parallelism)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference_model)
    trainer.setup_optimization()
    if config.resume_from:
        trainer.restore(Path(config.resume_from) / 'LATEST')
    next(iter(trainer.train_batches()))
    return trainer


class Evil:
    """Unpickling this object writes `marker` (the classic malicious-pickle payload, made harmless)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("this code ran")',)


def start_train(args, cwd, script=ROOT / 'train.py'):
    """Start `python SCRIPT ARGS` in the background (output to cwd/output.txt, so no pipe can fill); returns the Popen."""
    output = open(Path(cwd) / 'output.txt', 'w')
    return subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=dict(os.environ, **TRAIN_ENV),
                            stdout=output, stderr=subprocess.STDOUT, text=True)


def wait_until(condition, process, timeout=300):
    """Poll `condition()` every 10 ms until it holds; fails if `process` ends first or time runs out."""
    import time
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f'the process ended (exit code {process.returncode}) before the awaited moment')
        if time.time() > deadline:
            process.kill()
            raise AssertionError('timed out')
        time.sleep(0.01)


def train_in_process(overrides, tmp_path) -> Path:
    """What `python train.py OVERRIDES` does (BasicTrainer), in this process, without the interpreter start;
    returns the run directory."""
    import train
    config = compose_config(overrides, tmp_path)
    parallelism = train.prepare_run(config)
    policy, reference_model = train.build_run_models(config, parallelism)
    train.run_trainer(config, parallelism, policy, reference_model)
    return Path(config.local_run_dir)


def save_tiny_llama(directory):
    """A 2-layer Llama with tied input/output embeddings, 4 query and 2 key/value heads, random weights; its directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
