"""A rank that dies: SIGKILL one of the 2 gloo processes of an FSDP run mid-training, under train.py's own launcher
(torch.multiprocessing.spawn) and under torchrun. The run ends within seconds (bounded: well under a minute) with a
message naming the rank that died, not a hang; the last checkpoint loads, and resume_from finishes the run (as
BasicTrainer in this process, which reads any trainer's checkpoint, to save a second 2-process start-up; an FSDP run
resumed by FSDP is tests/test_distributed.py's).

Each process prints `rank R of N: pid P on HOST` when it joins the process group, which is how the test (and a
user) finds the process of rank 1."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from checkpoints import load_checkpoint_file
from distributed import get_open_port
from helpers import FAST, ROOT, TRAIN_ENV, train_in_process, wait_until

pytestmark = pytest.mark.slow

# 8 FSDP steps of 8 examples on 2 processes, a checkpoint every 16 examples
RUN = [*FAST, 'loss=sft', 'optimizer=SGD', 'lr=1e-3', 'trainer=FSDPTrainer', 'n_cpu_processes=2', 'n_examples=64',
       'eval_every=16', 'do_first_eval=false', 'minimum_log_interval_secs=0']


def kill_rank_1_after_the_first_checkpoint(command, cwd):
    """Start `command`; once a checkpoint exists, SIGKILL the process of rank 1. Returns (output, return code,
    seconds from the kill to the end of the launcher, the run directory, the pid killed)."""
    with open(cwd / 'output.txt', 'w') as output:
        launcher = subprocess.Popen(command, cwd=cwd, env=dict(os.environ, **TRAIN_ENV), stdout=output,
                                    stderr=subprocess.STDOUT, text=True)
    read = lambda: (cwd / 'output.txt').read_text()
    wait_until(lambda: any(cwd.glob('local/*/*/LATEST')) and re.search(r'rank 1 of 2: pid (\d+)', read()), launcher)
    pid = int(re.search(r'rank 1 of 2: pid (\d+)', read())[1])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError('the run hung after rank 1 was killed:\n' + read()[-3000:])
    return read(), code, time.monotonic() - killed_at, next(cwd.glob('local/*/*/LATEST')).parent, pid


def check_the_last_checkpoint_and_resume(run_dir, cwd, capsys):
    """LATEST is a complete checkpoint of 16 to 48 examples; resume_from trains to 64."""
    state = load_checkpoint_file(run_dir / 'LATEST' / 'trainer_state.pt')
    assert 16 <= state['example_counter'] < 64
    assert load_checkpoint_file(run_dir / 'LATEST' / 'policy.pt')['step_idx'] == state['example_counter']
    latest = (run_dir / 'LATEST').resolve()
    capsys.readouterr()
    train_in_process([*RUN, f'resume_from={run_dir}', 'trainer=BasicTrainer'], cwd / 'local')
    assert f'Resumed from {latest} at {state["example_counter"]} examples' in capsys.readouterr().out
    assert os.readlink(run_dir / 'LATEST') == 'step-64' and (run_dir / 'hf_model' / 'model.safetensors').is_file()


def test_a_killed_rank_under_the_spawn_launcher_ends_the_run_with_its_name(tmp_path, capsys):
    command = [sys.executable, str(ROOT / 'train.py'), *RUN, f'local_dirs=[{tmp_path / "local"}]']
    output, code, seconds, run_dir, pid = kill_rank_1_after_the_first_checkpoint(command, tmp_path)
    assert code == 1 and seconds < 60, (code, seconds)
    latest = (run_dir / 'LATEST').resolve()
    assert (f'ProcessDiedError: rank 1 (pid {pid}) was killed by SIGKILL; the other processes of the run were '
            f'stopped. The last checkpoint, {latest}, is intact; continue with:  python train.py <the same '
            f'arguments> resume_from={run_dir}') in output, output[-3000:]
    check_the_last_checkpoint_and_resume(run_dir, tmp_path, capsys)


def test_a_killed_rank_under_torchrun_ends_the_run_with_its_name(tmp_path, capsys):
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--rdzv_backend', 'c10d',
               '--rdzv_endpoint', f'127.0.0.1:{get_open_port()}', str(ROOT / 'train.py'), *RUN,
               f'local_dirs=[{tmp_path / "local"}]']
    output, code, seconds, run_dir, pid = kill_rank_1_after_the_first_checkpoint(command, tmp_path)
    assert code == 1 and seconds < 60, (code, seconds)
    # torchrun's report names the rank that failed first; the survivor says what it saw and what is kept
    root_cause = output[output.index('Root Cause (first observed failure):'):]
    assert re.search(rf'rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9 \(pid: {pid}\)', root_cause), root_cause
    latest = (run_dir / 'LATEST').resolve()
    assert re.search(rf'ProcessDiedError: rank 0: rank 1 of this run died or stopped answering \(.*Connection (closed|reset) '
                     rf'by peer.*\); the launcher\'s report names the process that failed first\. The last checkpoint, '
                     rf'{re.escape(str(latest))}, is intact; continue with:  python train\.py <the same arguments> '
                     rf'resume_from={re.escape(str(run_dir))}', output), output[-4000:]
    check_the_last_checkpoint_and_resume(run_dir, tmp_path, capsys)
