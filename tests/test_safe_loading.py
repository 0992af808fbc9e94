"""Archives and checkpoints are unpickled with weights_only=True: a malicious file is refused and nothing in it runs."""
import re
import shutil

import pytest
import torch

from helpers import FAST, ROOT, Evil, start_run
from checkpoints import load_checkpoint_file

REFUSED = 'contains Python objects other than tensors and was refused (loaded with weights_only=True, nothing in it ran)'


def evil_checkpoint(path, marker):
    """A checkpoint file in the original's format whose 'state' runs code when unpickled."""
    torch.save({'step_idx': 0, 'state': Evil(marker), 'metrics': {}}, path)
    return path


def test_the_malicious_file_is_real(tmp_path):
    """Control: the plain unpickling the original did (torch.load without weights_only) runs the payload."""
    path = evil_checkpoint(tmp_path / 'policy.pt', tmp_path / 'pwned')
    torch.load(path, weights_only=False)
    assert (tmp_path / 'pwned').read_text() == 'this code ran'


def test_load_checkpoint_file_refuses_it_and_runs_nothing(tmp_path):
    path = evil_checkpoint(tmp_path / 'policy.pt', tmp_path / 'pwned')
    with pytest.raises(ValueError) as info:
        load_checkpoint_file(path, 'model.archive')
    assert str(info.value).startswith(f'model.archive {path} {REFUSED}. Only load archives you trust')
    assert not (tmp_path / 'pwned').exists()


@pytest.fixture(scope='module')
def run_with_checkpoint(tmp_path_factory):
    """(local_dirs root, a run directory whose LATEST is a real checkpoint written by BasicTrainer.save)."""
    root = tmp_path_factory.mktemp('local_dirs')
    trainer = start_run([*FAST, 'loss=sft'], root)
    trainer.save()
    return root, trainer.run_dir


@pytest.mark.parametrize('name', ['policy.pt', 'optimizer.pt', 'scheduler.pt', 'trainer_state.pt'])
def test_a_malicious_file_in_a_resumed_checkpoint_is_refused(run_with_checkpoint, tmp_path, name):
    """resume_from=RUN reads four files of RUN/LATEST; each one poisoned in turn is refused."""
    root, run_dir = run_with_checkpoint
    poisoned = tmp_path / 'run'
    shutil.copytree(run_dir, poisoned, symlinks=True)
    evil_checkpoint(poisoned / 'LATEST' / name, tmp_path / 'pwned')
    with pytest.raises(ValueError, match=re.escape(REFUSED)):
        start_run([*FAST, 'loss=sft', f'resume_from={poisoned}'], root)
    assert not (tmp_path / 'pwned').exists()


def test_every_torch_load_in_the_code_passes_weights_only_true():
    """No code path unpickles arbitrary objects: each torch.load call in the project's modules says weights_only=True."""
    calls = []
    for path in ROOT.glob('*.py'):
        calls += [(path.name, call) for call in re.findall(r'torch\.load\([^)]*\)', path.read_text())]
    assert calls, 'no torch.load call found'
    for name, call in calls:
        assert 'weights_only=True' in call, (name, call)
