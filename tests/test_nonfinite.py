"""A NaN loss stops the run naming the step and the batch, and leaves the last checkpoint untouched;
on_nonfinite=skip skips such batches instead and counts them.

The NaN is real: with lr=1e30 the first RMSprop step moves every weight by about lr/√(1−α) = 1e31
(|g|/√((1−α)g²) = 10), still finite in float32, so the first step's checkpoint saves; the next forward
pass squares such values (1e62 > float32's 3.4e38) and the loss is NaN.
"""
import hashlib
import json
import os

import pytest

from helpers import FAST, run_train, train_in_process

pytestmark = pytest.mark.slow


def file_states(directory):
    """{name: (sha256, mtime)} of every file in `directory`."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def blown_up_run(tmp_path):
    """A finished 1-step SFT run with lr=1e30: step-8 holds finite but enormous weights."""
    run_dir = train_in_process([*FAST, 'loss=sft', 'lr=1e30', 'n_examples=8', 'eval_every=8', 'do_first_eval=false',
                                'minimum_log_interval_secs=0'], tmp_path)
    assert os.readlink(run_dir / 'LATEST') == 'step-8'
    return run_dir


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(blown_up_run, tmp_path):
    before = file_states(blown_up_run / 'step-8')
    result = run_train([*FAST, 'loss=sft', 'lr=1e30', 'n_examples=32', 'eval_every=8', 'do_first_eval=false',
                        'minimum_log_interval_secs=0', f'local_dirs=[{tmp_path}]', f'resume_from={blown_up_run}'],
                       cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert 'NonFiniteLossError: Non-finite loss [nan], gradient norm nan at training step 2 (examples 8–15 of the ' \
           "training stream; first prompt: '" in result.stderr
    assert (f'The last checkpoint, {(blown_up_run / "step-8").resolve()}, is intact. Lower lr, check the data of this '
            f'batch, or pass on_nonfinite=skip to skip such batches.') in result.stderr
    assert file_states(blown_up_run / 'step-8') == before
    assert os.readlink(blown_up_run / 'LATEST') == 'step-8'
    assert sorted(p.name for p in blown_up_run.glob('step-*')) == ['step-8']


def test_on_nonfinite_skip_counts_the_skipped_batches(blown_up_run, tmp_path, capsys):
    """Resumed at 8 examples for 2 more steps: both are NaN, both skipped (counters 1 then 2), and the
    run still finishes and saves."""
    train_in_process([*FAST, 'loss=sft', 'lr=1e30', 'n_examples=24', 'eval_every=8', 'do_first_eval=false',
                      'minimum_log_interval_secs=0', 'on_nonfinite=skip', f'resume_from={blown_up_run}'], tmp_path)
    assert 'Skipping training step 2 (examples 8–15 of the training stream' in capsys.readouterr().out
    lines = [json.loads(line) for line in (blown_up_run / 'metrics.jsonl').read_text().splitlines()]
    train_lines = [m for m in lines if m['split'] == 'train']
    assert [(m['counters/examples'], m.get('counters/skipped_batches')) for m in train_lines] == \
        [(8, None), (16, 1), (24, 2)]
    assert os.readlink(blown_up_run / 'LATEST') == 'step-24'
