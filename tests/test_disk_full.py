"""A full disk, on a real small file system: a tmpfs mounted for the test (skipped, with the reason, where mounting
is not permitted: a non-root user, a container without CAP_SYS_ADMIN).

A checkpoint that does not fit stops the run with a message naming the directory, the space needed and the space
free; the previous checkpoint and LATEST stay intact and, once space is freed, resume_from continues the run to
exactly the metrics of a run that never met a full disk. A tokenization or reference-cache write that does not fit
is given up with a warning, the run goes on with what it computed, and no partial file is left for a later run.
"""
import os
import re
import shutil
import subprocess
import warnings

import pytest
import torch

import data_sources as ds

import preference_datasets as pd
from checkpoints import load_checkpoint_file
from helpers import FAST, run_dir_from_output, run_train, train_in_process
from reference_cache import ReferenceLogps, load_reference_cache


@pytest.fixture
def small_disk(tmp_path):
    """A directory on its own 32 MB tmpfs, unmounted after the test."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    if shutil.which('mount') is None or os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root (and the mount command); the full-disk tests run as root')
    result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=32m', 'tmpfs', str(disk)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip()}); needs CAP_SYS_ADMIN')
    yield disk
    subprocess.run(['umount', '-l', str(disk)], check=True)


def leave_free(disk, n_bytes):
    """Fill `disk` with a ballast file (really allocated, not sparse) until about `n_bytes` are free; returns it."""
    ballast = disk / 'ballast'
    size = shutil.disk_usage(disk).free - n_bytes
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return ballast


def size_of(directory):
    return sum(f.stat().st_size for f in directory.rglob('*') if f.is_file())


def logged(run_dir):
    """metrics.jsonl without the entry that measures time."""
    import json
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != 'examples_per_second'} for line in lines]


# 4 SGD steps of 8 examples, checkpoints at 16 and 32 examples
RUN = [*FAST, 'loss=sft', 'optimizer=SGD', 'lr=1e-3', 'n_examples=32', 'eval_every=16', 'do_first_eval=false',
       'minimum_log_interval_secs=0', 'exp_name=full']


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_stops_clearly_keeps_the_last_one_and_resumes(small_disk, tmp_path):
    """The uninterrupted run first writes the embedded model and the data caches to the disk; its step-16 is
    C ≈ 3.5 MB (875,264 float32 weights). Its run directory is removed again and a ballast file leaves 1.5 C free:
    the same run as `python train.py` writes step-16 and stops at step-32, whose estimate (the tensors' bytes)
    is within 2% of C. After the ballast is deleted, resume_from logs exactly the uninterrupted run's metrics."""
    local = [f'local_dirs=[{small_disk}]']
    uninterrupted = train_in_process([*RUN, *local], tmp_path)
    expected = logged(uninterrupted)
    checkpoint_size = size_of(uninterrupted / 'step-16')
    assert 3.4e6 < checkpoint_size < 3.7e6
    shutil.rmtree(uninterrupted)
    ballast = leave_free(small_disk, int(1.5 * checkpoint_size))

    result = run_train([*RUN, *local], cwd=tmp_path, check=False)
    # a full disk is the user's to fix: the message alone, exit status 2 (utils.exits_on_user_error)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    run_dir = run_dir_from_output(result.stdout)
    message = re.search(rf'error: No space left in {re.escape(str(run_dir))}: writing step-32 needs about '
                        rf'([\d.]+) MB, and ([\d.]+) MB is free there now \(OSError: \[Errno 28\] No space left on '
                        rf'device\)\. {re.escape(str(run_dir / "step-32"))} was left as it was', result.stderr)
    assert message, result.stderr[-3000:]
    needed, free = float(message[1]) * 1e6, float(message[2]) * 1e6
    assert abs(needed - checkpoint_size) < 0.02 * checkpoint_size and free < needed
    assert (f'Free some space there (or move the run to a larger disk). The last checkpoint, {run_dir}/step-16, is '
            f'intact; continue with:  python train.py <the same arguments> resume_from={run_dir}') in result.stderr
    assert 'inline_container' not in result.stderr and 'iostream error' not in result.stderr
    # what is kept: LATEST -> step-16, complete and loadable; nothing half-written beside it
    assert os.readlink(run_dir / 'LATEST') == 'step-16'
    assert sorted(p.name for p in run_dir.iterdir()) == ['LATEST', 'config.yaml', 'metrics.jsonl', 'step-16']
    assert load_checkpoint_file(run_dir / 'LATEST' / 'policy.pt')['step_idx'] == 16

    ballast.unlink()
    train_in_process([*RUN, *local, f'resume_from={run_dir}'], tmp_path)
    assert logged(run_dir) == expected
    assert os.readlink(run_dir / 'LATEST') == 'step-32'


def test_tokenization_cache_on_a_full_disk_is_skipped_with_a_warning(small_disk, tmp_path, byte_tokenizer,
                                                                     toy_source):
    """200 prompts of the toy source tokenize to a cache of about 60 KB; with 8 KB free the write fails, the
    tokenized split is returned all the same (equal to one cached on a roomy disk), and neither the cache nor a
    temporary file is left. With the space back, the next call writes the cache."""
    settings = dict(max_length=64, max_prompt_length=32, silent=True, dataset_options={'n_prompts': 200})
    clean = pd.load_tokenized('toy', byte_tokenizer, cache_dir=tmp_path / 'roomy', **settings)
    ballast = leave_free(small_disk, 8192)
    with pytest.warns(ds.DataWarning, match=r'No space left in .*/tokenized: writing toy-train-dpo-\w+\.pt needs '
                                            r'about [\d.]+ KB.*\nContinuing without caching toy \(train\)'):
        tokenized = pd.load_tokenized('toy', byte_tokenizer, cache_dir=small_disk, **settings)
    assert tokenized.state_dict().keys() == clean.state_dict().keys()
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
               for a, b in zip(tokenized.state_dict().values(), clean.state_dict().values()))
    assert list((small_disk / 'beta_dpo' / 'tokenized').iterdir()) == []

    ballast.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        pd.load_tokenized('toy', byte_tokenizer, cache_dir=small_disk, **settings)
    assert len(list((small_disk / 'beta_dpo' / 'tokenized').iterdir())) == 1


def test_reference_cache_on_a_full_disk_keeps_the_values_in_memory(small_disk, tmp_path, capsys):
    """The reference pass over 24 training and 8 evaluation pairs, saving after every batch, its cache file on a full
    disk: the first save (8 pairs × 68 bytes = 544 bytes) fails with a warning, no later save is tried, the 32 pairs
    stay in memory with the values of a pass that could save, and no file is left."""
    from helpers import start_run
    trainer = start_run([*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=24', 'precompute_ref_log_probs=true'], tmp_path)
    clean = ReferenceLogps(trainer.reference.model, trainer.concatenated_forward)
    clean.precompute(trainer.reference_pass_batches(), tmp_path / 'clean.pt', trainer.local, trainer.gather, True, 0)

    leave_free(small_disk, 0)
    path = small_disk / 'reference.pt'
    capsys.readouterr()
    trainer.reference.precompute(trainer.reference_pass_batches(), path, trainer.local, trainer.gather, True, 0)
    output = capsys.readouterr().out
    assert re.search(r'WARNING: No space left in .*: writing reference\.pt needs about 544 bytes, and 0 bytes is free',
                     output), output
    assert 'Continuing with the reference log-probabilities in memory, without saving them.' in output
    assert len(trainer.reference.cache) == 32 and trainer.reference.cache == load_reference_cache(tmp_path / 'clean.pt')
    assert sorted(p.name for p in small_disk.iterdir()) == ['ballast']
