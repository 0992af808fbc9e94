"""A run killed with SIGKILL, or stopped by SIGTERM, and resumed with resume_from=RUN_DIR logs exactly
(bitwise, on CPU) what an uninterrupted run logs: every train and eval metric at every step but the
timing, so weights, optimizer, scheduler, β-DPO statistics and filter generator, RNG and data position
all come back. The kill lands at a moment the test picks: as soon as the first checkpoint appears.
Only the interrupted run is a separate process (a signal must hit a real `python train.py`); the
uninterrupted and the resumed runs do the same in this process, to save the interpreter starts."""
import json
import os
import signal

import pytest
import torch

from helpers import FAST, start_train, train_in_process, wait_until

pytestmark = pytest.mark.slow

# 4 steps of 8 examples, evaluated and saved at 16 and 32 examples
COMMON = [*FAST, 'n_examples=32', 'eval_every=16', 'do_first_eval=false', 'minimum_log_interval_secs=0', 'lr=1e-3']
LOSSES = {'sft': ['loss=sft'],
          'beta_dpo': ['loss=dpo', 'loss.mode_loss=beta_DPO', 'loss.beta=0.1', 'loss.mode_weight=0.2', 'loss.a=0.6']}


def logged_metrics(run_dir):
    """metrics.jsonl without the one entry that measures time."""
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    for line in lines:
        line.pop('examples_per_second', None)
    return lines


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """loss name → metrics of the run never interrupted (run once per loss)."""
    runs = {}

    def metrics(loss):
        if loss not in runs:
            tmp = tmp_path_factory.mktemp(f'uninterrupted_{loss}')
            runs[loss] = logged_metrics(train_in_process([*COMMON, *LOSSES[loss]], tmp))
        return runs[loss]
    return metrics


def start_and_wait_for_first_checkpoint(args, tmp_path):
    process = start_train(args, tmp_path)
    wait_until(lambda: any(tmp_path.glob('*/*/LATEST')), process)
    return process, next(tmp_path.glob('*/*/LATEST')).parent


@pytest.mark.parametrize('loss', ['sft', 'beta_dpo'])
def test_killed_and_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(loss, uninterrupted, tmp_path, capsys):
    args = [*COMMON, *LOSSES[loss], f'local_dirs=[{tmp_path}]']
    process, run_dir = start_and_wait_for_first_checkpoint(args, tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    checkpoint = torch.load(run_dir / 'LATEST' / 'trainer_state.pt', weights_only=True)
    k = checkpoint['example_counter']
    assert 16 <= k < 32, k
    train_in_process([*args, f'resume_from={run_dir}'], tmp_path)
    assert f'Resumed from {(run_dir / f"step-{k}").resolve()} at {k} examples' in capsys.readouterr().out
    expected = uninterrupted(loss)
    assert [m['counters/examples'] for m in expected] == [8, 16, 16, 24, 32, 32]
    assert logged_metrics(run_dir) == expected


def test_sigterm_saves_at_the_step_reached_then_resumes_exactly(uninterrupted, tmp_path):
    args = [*COMMON, *LOSSES['beta_dpo'], f'local_dirs=[{tmp_path}]']
    process, run_dir = start_and_wait_for_first_checkpoint(args, tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0
    output = (tmp_path / 'output.txt').read_text()
    n = torch.load(run_dir / 'LATEST' / 'trainer_state.pt', weights_only=True)['example_counter']
    assert 16 < n <= 32, n
    assert 'SIGTERM received: finishing this step, then saving a checkpoint' in output
    assert (f'Stopped by SIGTERM after {n} examples. Resume with:  python train.py <the same arguments> '
            f'resume_from={run_dir}') in output
    assert (run_dir / 'LATEST').resolve() == (run_dir / f'step-{n}').resolve()
    assert logged_metrics(run_dir)[-1]['counters/examples'] == n
    assert not (run_dir / 'hf_model').exists()  # the stopped run did not finish

    train_in_process([*args, f'resume_from={run_dir}'], tmp_path)
    assert logged_metrics(run_dir) == uninterrupted('beta_dpo')
    assert (run_dir / 'hf_model' / 'model.safetensors').is_file()
