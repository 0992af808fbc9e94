"""A run killed (SIGKILL) during the reference pass of precompute_ref_log_probs: the pairs it had saved are kept,
and the next start of the same command computes only the rest, to the values of a pass never interrupted."""
import os
import re
import signal

import pytest
import torch

from helpers import FAST, start_run, start_train, wait_until
from reference_cache import load_reference_cache

pytestmark = pytest.mark.slow

# 32 training batches of 8 pairs and one evaluation batch: 264 pairs; the killed run saves after every batch
RUN = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'synthetic.n_train=256', 'n_examples=256', 'precompute_ref_log_probs=true']
SAVE_OFTEN = ['precompute_save_every_secs=0']


def test_killed_reference_pass_resumes_from_what_it_saved(tmp_path, capsys):
    process = start_train([*RUN, *SAVE_OFTEN, f'local_dirs=[{tmp_path}]'], tmp_path)
    wait_until(lambda: any(tmp_path.glob('*/beta_dpo/reference_logps/*.pt')), process)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    path, = tmp_path.glob('*/beta_dpo/reference_logps/*.pt')
    saved = load_reference_cache(path)
    assert 0 < len(saved) < 264 and len(saved) % 8 == 0, len(saved)

    trainer = start_run(RUN, tmp_path)
    capsys.readouterr()
    trainer.precompute_reference_logps()
    output = capsys.readouterr().out
    assert f'reference log-probabilities of 264 pairs ({264 - len(saved)} computed now) in {path}' in output
    assert re.search(r'unreadable', output) is None

    clean = start_run(RUN, tmp_path / 'clean')
    clean.precompute_reference_logps()
    assert load_reference_cache(path) == clean.reference.cache == trainer.reference.cache
    assert all(torch.isfinite(torch.tensor(v)).all() for v in clean.reference.cache.values())
