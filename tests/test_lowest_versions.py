"""train.py on the lowest versions models.MIN_VERSIONS claims: transformers 5.5.0 (with requirements.txt's torch and the
rest), in a second virtual environment built under .cache/ on first use.

Before logps.py took the head's input itself, every lean log-probability on transformers < 5.23 failed in the model's
forward (GPT-NeoX and Llama: `IndexError: too many indices for tensor of dimension 3`, 5.23's 2-D logits_to_keep
mask), and activation_checkpointing=true with AttributeError (activation_checkpointing_enable is 5.23's name).
5.0 to 5.4 run, but read a GPT-NeoX config.json's rope_parameters.partial_rotary_factor as 0.25 whatever it says (the
embedded tiny preset's 1.0 included: the same weights then give other logits, SFT losses 6e-5 relative apart), hence
the minimum 5.5.

Building the environment takes about 2 min 15 s on 2 cores with the torch wheel in pip's cache or find-links (pip
downloads transformers 5.0.0 and its pins); the test then takes about a minute. It is skipped when pip cannot fetch
the packages.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from helpers import FAST, ROOT, TRAIN_ENV, run_dir_from_output

pytestmark = pytest.mark.slow

LOWEST_TRANSFORMERS = '5.5.0'
VENV = ROOT / '.cache' / f'venv-transformers-{LOWEST_TRANSFORMERS}'
COMMON = [*FAST, 'optimizer=SGD', 'lr=0.01', 'n_examples=16', 'eval_every=16', 'minimum_log_interval_secs=0']
# activation checkpointing too: transformers 5.0 has gradient_checkpointing_enable only
BETA_DPO = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6',
            'activation_checkpointing=true']
NO_NETWORK = ('Could not find a version', 'No matching distribution', 'NewConnectionError', 'Temporary failure in name',
              'Network is unreachable', 'ConnectTimeout', 'ReadTimeout', 'ProxyError')


def lowest_python():
    """The environment's python, built on first use (complete once its marker exists); skips if pip cannot fetch."""
    python, marker = VENV / 'bin' / 'python', VENV / '.complete'
    if marker.exists():
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, '-m', 'venv', str(VENV)], check=True)
    requirements = VENV / 'requirements-lowest.txt'
    requirements.write_text(''.join(line + '\n' for line in (ROOT / 'requirements.txt').read_text().splitlines()
                                    if not line.startswith('transformers')))
    result = subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                             f'transformers=={LOWEST_TRANSFORMERS}', '-r', str(requirements)],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        output = result.stdout[-2000:] + result.stderr[-2000:]
        if any(text in output for text in NO_NETWORK):
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f'pip cannot fetch transformers {LOWEST_TRANSFORMERS} and the requirements: {output[-300:]}')
        raise AssertionError(f'pip install into {VENV} failed:\n{output}')
    marker.write_text(LOWEST_TRANSFORMERS + '\n')
    return python


def train(python, args, cwd):
    result = subprocess.run([str(python), str(ROOT / 'train.py'), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, **TRAIN_ENV))
    assert result.returncode == 0, f'{python} train.py {" ".join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}'
    return run_dir_from_output(result.stdout)


def sft_then_beta_dpo(python, tmp):
    """(SFT losses, β-DPO losses) of 2 SGD steps each, the β-DPO run from the SFT run's archive."""
    sft = train(python, [*COMMON, f'local_dirs=[{tmp}]', 'loss=sft', 'exp_name=sft'], tmp)
    dpo = train(python, [*COMMON, *BETA_DPO, f'local_dirs=[{tmp}]', 'exp_name=beta_dpo',
                         f'model.archive={sft}/LATEST/policy.pt'], tmp)
    return [[json.loads(line)['loss/train'] for line in (run / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['split'] == 'train'] for run in (sft, dpo)]


def test_sft_and_beta_dpo_on_the_lowest_transformers_equal_the_main_environment(tmp_path):
    """transformers 5.5.0: SFT, then β-DPO with activation checkpointing from its archive, 2 steps each; the first
    β-DPO loss is ln 2 = 0.693147 (policy = reference) and every loss equals the main environment's (transformers
    5.23) within 1e-5 relative: the same torch computes the same model code."""
    python = lowest_python()
    version = subprocess.run([str(python), '-c', 'import transformers; print(transformers.__version__)'],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == LOWEST_TRANSFORMERS
    (tmp_path / 'lowest').mkdir()
    (tmp_path / 'main').mkdir()
    lowest_sft, lowest_dpo = sft_then_beta_dpo(python, tmp_path / 'lowest')
    main_sft, main_dpo = sft_then_beta_dpo(sys.executable, tmp_path / 'main')
    assert len(lowest_sft) == len(lowest_dpo) == 2
    assert lowest_dpo[0] == pytest.approx(math.log(2), abs=1e-5)
    assert lowest_sft == pytest.approx(main_sft, rel=1e-5)
    assert lowest_dpo == pytest.approx(main_dpo, rel=1e-5)
    assert lowest_sft[1] < lowest_sft[0]  # SFT trained: the second step's NLL is lower
