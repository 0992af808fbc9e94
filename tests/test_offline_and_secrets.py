"""No network, and secrets in the environment: `python train.py` with wandb enabled, WANDB_API_KEY and the judge
endpoint's OPENAI_API_KEY set (planted values), on a machine whose wandb server does not resolve.

The run does not wait for wandb's 60-second retries: a 5-second probe finds the server unreachable and wandb logs
offline under `<local dir>/<user>/wandb/offline-run-*` (where the README says). Neither key appears in any file the
run writes, anywhere (run directory, caches, wandb's offline run and its logs, the home and temporary directories it
was given), nor in its console output.
"""
import getpass
import os
import re
import secrets
import subprocess
import sys
import threading
import time

import pytest

from helpers import FAST, ROOT, run_dir_from_output

def run_with_line_times(command, cwd, env, timeout=300):
    """Run `command`; returns [(seconds since start, line)] of its merged output and its return code."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - start, line) for line in process.stdout))
    reader.start()
    try:
        code = process.wait(timeout=timeout)
    finally:
        process.kill()
        reader.join()
    return lines, code


def seconds_at(lines, prefix):
    return next(t for t, line in lines if line.startswith(prefix))


@pytest.mark.slow
def test_offline_start_is_quick_and_no_secret_reaches_a_file(tmp_path):
    wandb_key, judge_key = secrets.token_hex(20), 'sk-' + secrets.token_hex(24)
    home, scratch, local = tmp_path / 'home', tmp_path / 'tmp', tmp_path / 'local'
    for directory in (home, scratch):
        directory.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(WANDB_API_KEY=wandb_key, OPENAI_API_KEY=judge_key, HOME=str(home), TMPDIR=str(scratch),
               HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONUNBUFFERED='1')
    command = [sys.executable, str(ROOT / 'train.py'), *[a for a in FAST if not a.startswith('wandb.')],
               'wandb.enabled=true', 'loss=dpo', 'loss.beta=0.1', 'n_examples=16', 'eval_every=16', f'local_dirs=[{local}]']
    lines, code = run_with_line_times(command, tmp_path, env)
    output = ''.join(line for _, line in lines)
    assert code == 0, output[-3000:]

    # wandb's start: from the models being built to the data of the trainer, which wandb.init precedes
    seconds = seconds_at(lines, 'synthetic (test)') - seconds_at(lines, 'policy: ')
    assert seconds < 20, (seconds, output[-3000:])
    wandb_dir = local / getpass.getuser() / 'wandb'
    assert re.search(rf'wandb: cannot reach \S+ within 5 s, logging offline under {re.escape(str(wandb_dir))}; upload '
                     rf'later with `wandb sync {re.escape(str(wandb_dir))}/offline-run-\*`', output), output[-3000:]
    offline_runs = list(wandb_dir.glob('offline-run-*'))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob('run-*.wandb'))

    run_dir = run_dir_from_output(output)
    written = [p for p in tmp_path.rglob('*') if p.is_file() and not p.is_symlink()]
    assert {run_dir / 'config.yaml', run_dir / 'metrics.jsonl', run_dir / 'step-16' / 'policy.pt',
            offline_runs[0] / 'files' / 'output.log', offline_runs[0] / 'logs' / 'debug.log'} <= set(written)
    assert len(written) > 20  # also wandb's own logs under HOME, the caches and the exported model
    for key in (wandb_key, judge_key):
        assert key not in output
        leaks = [p for p in written if key.encode() in p.read_bytes()]
        assert leaks == [], leaks


def test_a_config_value_holding_a_secret_is_refused(tmp_path, monkeypatch):
    """`wandb.project=${oc.env:WANDB_API_KEY}` would write the key into config.yaml: validation refuses it, naming
    the key and the variable (without the value)."""
    from helpers import compose_config
    from train import validate_config
    key = secrets.token_hex(20)
    monkeypatch.setenv('WANDB_API_KEY', key)
    problems = validate_config(compose_config(['wandb.project=${oc.env:WANDB_API_KEY}'], tmp_path))
    assert problems == ['wandb.project holds the value of the environment variable WANDB_API_KEY, a secret, which '
                        'would be written to config.yaml, the logs and wandb; secrets are read from the environment '
                        'only, so remove it from the config']
    assert validate_config(compose_config([], tmp_path)) == []
