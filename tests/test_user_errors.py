"""A user's mistake through the real entry points: one message on stderr, exit status 2, no traceback, nothing
written; HYDRA_FULL_ERROR=1 still shows the traceback (utils.exits_on_user_error)."""
import os
import subprocess
import sys

import pytest

# each case starts train.py (about 2.5 s): the slow tier
pytestmark = pytest.mark.slow

from helpers import ROOT, TRAIN_ENV

MISTAKES = [
    # (what train.py is given, the start of the message's line)
    (['loss=dpo', 'loss.beta=0.1', 'loss.mode_los=beta_DPO'],
     "loss.mode_los is not a key of train.py's config; did you mean loss.mode_loss?"),
    (['loss=dpo', 'loss.beta=0.1', '+loss.mode_los=beta_DPO'],
     "loss.mode_los is not a key of train.py's config; did you mean loss.mode_loss?"),
    (['bach_size=8'], "bach_size is not a key of train.py's config; did you mean batch_size?"),
    (['loss=dpo', 'loss.beta=0.1', 'loss.a=0.6'],
     'loss.a=0.6 does nothing without loss.mode_loss=beta_DPO'),
    (['loss=dpo'], 'missing values for: loss.beta'),
    (['batch_size=6', 'gradient_accumulation_steps=4'], 'batch_size=6 must be divisible'),
    (['loss=dpo', 'loss.beta=0.1', 'model.archive=/no/such/policy.pt'], 'model.archive=/no/such/policy.pt does not exist'),
    (['datasets=[hh:/nonexistent]'], 'datasets=[hh:/nonexistent]: /nonexistent does not exist'),
    (['loss=ipo', 'loss.beta=0.1', 'loss.label_smoothing=0.1'],
     'loss.label_smoothing=0.1 does nothing with loss.loss_type=ipo'),
    (['loss=simpo', 'loss.loss_type=sigmoid'], "loss.loss_type='sigmoid' is not a loss of loss=simpo; use loss=dpo"),
]


def run(args, tmp_path, **env):
    return subprocess.run([sys.executable, str(ROOT / 'train.py'), f'local_dirs=[{tmp_path}/runs]', *args],
                          cwd=tmp_path, env=dict(os.environ, **TRAIN_ENV, **env), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize('args, message', MISTAKES, ids=[' '.join(a) for a, _ in MISTAKES])
def test_a_mistake_is_one_message_and_status_2(tmp_path, args, message):
    result = run(args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stdout + result.stderr
    assert result.stderr.startswith('error: '), result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').rglob('config.yaml'))


def test_every_mistake_of_a_command_is_reported_at_once(tmp_path):
    """Two unknown keys and a bad value: three lines, one message."""
    result = run(['loss=dpo', 'loss.beta=0.1', 'loss.mode_los=beta_DPO', 'loss.fliter=tail'], tmp_path)
    assert result.returncode == 2
    assert 'did you mean loss.mode_loss?' in result.stderr and 'did you mean loss.filter?' in result.stderr


def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run(['loss=dpo'], tmp_path, HYDRA_FULL_ERROR='1')
    assert result.returncode != 0 and 'Traceback' in result.stderr and 'UserError' in result.stderr
