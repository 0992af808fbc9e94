"""A process killed with SIGKILL in the middle of writing a checkpoint leaves the previous one complete:
LATEST still points to it, it loads with torch.load(weights_only=True), model.archive accepts it, and
resume_from continues from it (clearing the half-written directory)."""
import os
import signal

import pytest
import torch

from helpers import FAST, ROOT, start_run, start_train, wait_until
from checkpoints import atomic_path, point_latest_to

ARGS = [*FAST, 'loss=sft', 'n_examples=48', 'eval_every=16', 'do_first_eval=false']


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    """Saves at 16 and 32 examples; the save of step-32 stalls after writing policy.pt, optimizer.pt and
    scheduler.pt into its temporary directory, halfway through trainer_state.pt, and the process is killed there."""
    process = start_train([*ARGS, f'local_dirs=[{tmp_path}]'], tmp_path, script=ROOT / 'tests' / 'stalled_save_train.py')
    wait_until(lambda: 'stalled while writing step-32' in (tmp_path / 'output.txt').read_text(), process)
    run_dir = next(tmp_path.glob('*/*/LATEST')).parent
    partial, = run_dir.glob('.step-32.tmp-*')
    assert sorted(p.name for p in partial.iterdir()) == ['optimizer.pt', 'policy.pt', 'scheduler.pt', 'trainer_state.pt']
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    assert not (run_dir / 'step-32').exists()
    assert os.readlink(run_dir / 'LATEST') == 'step-16'
    for name in ('policy.pt', 'optimizer.pt', 'scheduler.pt', 'trainer_state.pt'):
        assert torch.load(run_dir / 'LATEST' / name, weights_only=True)
    assert torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)['step_idx'] == 16

    dpo = start_run([*FAST, 'loss=dpo', 'loss.beta=0.1', f'model.archive={run_dir}/LATEST/policy.pt'], tmp_path)
    archive = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)['state']
    for key, value in dpo.reference.model.state_dict().items():
        assert torch.equal(value, archive[key]), key

    resumed = start_run([*ARGS, f'resume_from={run_dir}'], tmp_path)
    assert resumed.example_counter == 16 and resumed.batch_counter == 2
    assert not list(run_dir.glob('.step-*'))  # the half-written directory is gone


def test_a_failed_write_leaves_no_directory_and_the_old_checkpoint(tmp_path):
    """An exception inside the block (disk full, a bug) removes the temporary directory; the earlier
    step-8 and LATEST → step-8 are untouched."""
    with atomic_path(tmp_path / 'step-8', directory=True) as tmp:
        (tmp / 'policy.pt').write_bytes(b'complete')
    point_latest_to(tmp_path, 'step-8')
    with pytest.raises(OSError, match='No space left on device'):
        with atomic_path(tmp_path / 'step-16', directory=True) as tmp:
            (tmp / 'policy.pt').write_bytes(b'half')
            raise OSError(28, 'No space left on device')
    assert sorted(os.listdir(tmp_path)) == ['LATEST', 'step-8']
    assert (tmp_path / 'LATEST' / 'policy.pt').read_bytes() == b'complete'


def test_replacing_a_checkpoint_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    with atomic_path(tmp_path / 'step-8', directory=True) as tmp:
        (tmp / 'policy.pt').write_bytes(b'old')
    with atomic_path(tmp_path / 'step-8', directory=True) as tmp:
        (tmp / 'policy.pt').write_bytes(b'new')
        assert (tmp_path / 'step-8' / 'policy.pt').read_bytes() == b'old'
    assert (tmp_path / 'step-8' / 'policy.pt').read_bytes() == b'new'
    assert os.listdir(tmp_path) == ['step-8']


def test_leftovers_of_killed_saves_are_removed_and_a_displaced_checkpoint_is_put_back(tmp_path):
    """Killed (1) while writing step-24, (2) while swapping LATEST, (3) between the two renames that
    replace step-16: the first two are deleted, the complete old step-16 is renamed back."""
    from checkpoints import remove_incomplete_checkpoints
    (tmp_path / '.step-24.tmp-abc').mkdir()
    (tmp_path / '.step-24.tmp-abc' / 'policy.pt').write_bytes(b'half')
    os.symlink('step-16', tmp_path / '.LATEST.tmp-123')
    (tmp_path / '.step-16.old-123').mkdir()
    (tmp_path / '.step-16.old-123' / 'policy.pt').write_bytes(b'complete')
    removed = remove_incomplete_checkpoints(tmp_path)
    assert [p.name for p in removed] == ['.LATEST.tmp-123', '.step-16.old-123', '.step-24.tmp-abc']
    assert sorted(os.listdir(tmp_path)) == ['step-16']
    assert (tmp_path / 'step-16' / 'policy.pt').read_bytes() == b'complete'
