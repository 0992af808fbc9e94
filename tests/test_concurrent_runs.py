"""Two `python train.py` processes started together on the same data with the same local_dirs, which holds no cache
yet: both build the embedded model, tokenize the data and precompute the reference log-probabilities into the same
cache files at the same time. Both finish, each in its own run directory, with the same metrics (the same seed and
settings, so any file read half-written would show); every cache reads back valid, and no temporary file is left."""
import json
import subprocess

import pytest
import torch

import preference_datasets as pd
from helpers import FAST, run_dir_from_output, start_train
from models import model_file_problems
from reference_cache import checked_reference_cache

pytestmark = pytest.mark.slow

RUN = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=16', 'eval_every=16', 'optimizer=SGD', 'lr=0.1',
       'precompute_ref_log_probs=true', 'precompute_save_every_secs=0', 'minimum_log_interval_secs=0']


def logged(run_dir):
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != 'examples_per_second'} for line in lines]


def test_two_runs_started_together_share_the_caches_safely(tmp_path):
    local = tmp_path / 'local'
    runs = []
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        runs.append((tmp_path / name, start_train([*RUN, f'local_dirs=[{local}]'], tmp_path / name)))
    outputs = []
    for cwd, process in runs:
        try:
            assert process.wait(timeout=300) == 0, (cwd / 'output.txt').read_text()[-3000:]
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        outputs.append((cwd / 'output.txt').read_text())
    run_dirs = [run_dir_from_output(output) for output in outputs]
    assert run_dirs[0] != run_dirs[1]
    assert logged(run_dirs[0]) == logged(run_dirs[1])
    assert [m['counters/examples'] for m in logged(run_dirs[0])] == [0, 8, 16, 16]
    for output in outputs:
        assert 'unreadable' not in output and 'damaged' not in output and 'Traceback' not in output

    user_dir = run_dirs[0].parent
    model_dir, = user_dir.glob('embedded_models/*')
    assert model_file_problems(model_dir, 'the embedded model') == []
    tokenized = list(user_dir.glob('beta_dpo/tokenized/*.pt'))
    assert len(tokenized) == 2
    for path in tokenized:
        pd.TokenizedSplit.from_state_dict(torch.load(path, weights_only=True))
    reference, = user_dir.glob('beta_dpo/reference_logps/*.pt')
    assert len(checked_reference_cache(torch.load(reference, weights_only=True))) == 24
    assert [p for p in user_dir.rglob('*') if '.tmp-' in p.name or '.old-' in p.name] == []
