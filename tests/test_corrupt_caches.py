"""Damaged caches are detected, reported and rebuilt, and the run's results equal a clean run's.

The caches a run reads back from `<local dir>/<user>/`: the tokenized splits (beta_dpo/tokenized/), the reference
log-probabilities (beta_dpo/reference_logps/), the embedded model written once with save_pretrained
(embedded_models/) and a GGUF file's conversion into a Hugging Face directory (gguf_models/). Each is damaged the
ways a full disk, a killed copy or a bad sector damage files: cut short, overwritten with garbage, or a readable
file whose contents do not fit.
"""
import json
import warnings

import pytest
import torch

import data_sources as ds

import preference_datasets as pd
from helpers import FAST, train_in_process
from reference_cache import REFERENCE_CACHE_VERSION as VERSION, checked_reference_cache

# 3 DPO steps of 8 pairs with the reference log-probabilities precomputed, evaluated before and after
RUN = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=24', 'eval_every=24', 'optimizer=SGD', 'lr=0.1',
       'precompute_ref_log_probs=true', 'minimum_log_interval_secs=0']


def logged(run_dir):
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != 'examples_per_second'} for line in lines]


def cut_short(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.slow
def test_damaged_caches_are_rebuilt_and_the_run_equals_a_clean_one(tmp_path, capsys):
    clean = logged(train_in_process(RUN, tmp_path))
    assert [m['counters/examples'] for m in clean] == [0, 8, 16, 24, 24]
    user_dir = next(tmp_path.glob('*/beta_dpo')).parent
    train_cache, = user_dir.glob('beta_dpo/tokenized/synthetic-train-*.pt')
    test_cache, = user_dir.glob('beta_dpo/tokenized/synthetic-test-*.pt')
    reference_cache, = user_dir.glob('beta_dpo/reference_logps/*.pt')

    # 1. the training split's cache cut in half, the test split's readable but with offsets that do not fit
    #    its arrays, the reference cache overwritten with garbage
    cut_short(train_cache)
    state = torch.load(test_cache, weights_only=True)
    state['chosen_ids.offsets'] = state['chosen_ids.offsets'][:-3]
    torch.save(state, test_cache)
    reference_cache.write_bytes(b'\x80\x02garbage' * 100)
    capsys.readouterr()
    with pytest.warns(ds.DataWarning) as caught:
        assert logged(train_in_process(RUN, tmp_path)) == clean
    reports = sorted(str(w.message) for w in caught if 'tokenization cache' in str(w.message))
    assert len(reports) == 2
    assert reports[0].startswith(f'{test_cache}: unreadable tokenization cache (ValueError: chosen_ids offsets do '
                                 f'not fit their 16 entries')
    assert reports[1].startswith(f'{train_cache}: unreadable tokenization cache (')
    assert all(r.endswith('; rebuilding it') for r in reports)
    output = capsys.readouterr().out
    assert (f'{reference_cache}: unreadable reference log-probability cache (UnpicklingError: not only tensors and '
            f'plain containers, so nothing in it was run); recomputing') in output
    assert f'reference log-probabilities of 32 pairs (32 computed now) in {reference_cache}' in output

    # the rebuilt caches read back cleanly
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for path in (train_cache, test_cache):
            pd.TokenizedSplit.from_state_dict(torch.load(path, weights_only=True))
    assert len(checked_reference_cache(torch.load(reference_cache, weights_only=True))) == 32

    # 2. the embedded model's weights cut short
    weights, = user_dir.glob('embedded_models/tiny-*/model.safetensors')
    cut_short(weights)
    assert logged(train_in_process(RUN, tmp_path)) == clean
    output = capsys.readouterr().out
    assert (f'{weights.parent}: damaged cache ({weights} is not a readable safetensors file (Error while '
            f'deserializing header: incomplete metadata, file not fully covered): it is truncated or damaged; '
            f'download or save the model again); rebuilding it') in output
    assert weights.stat().st_size > 3e6


@pytest.mark.parametrize('state, reason', [
    ({'version': VERSION, 'logps': {'a' * 32: [-1.0, 'x']}}, 'its entries are not pairs of log-probabilities'),
    ({'version': VERSION, 'logps': {'a' * 32: [-1.0]}}, 'its entries are not pairs of log-probabilities'),
    ({'version': VERSION, 'logps': {'a' * 32: [float('nan'), -2.0]}}, 'its entries are not pairs of log-probabilities'),
    ({'version': VERSION, 'logps': []}, 'its entries are not pairs of log-probabilities'),
    ({'version': VERSION - 1, 'logps': {}}, f'not a version {VERSION} reference log-probability cache'),
])
def test_a_reference_cache_that_reads_but_does_not_fit_is_refused(state, reason):
    """A pair must be two log-probabilities (floats, not NaN) of this cache version; a well-formed one passes."""
    with pytest.raises(ValueError, match=reason):
        checked_reference_cache(state)
    assert checked_reference_cache({'version': VERSION, 'logps': {'a' * 32: [-1.0, -2.5]}}) == {'a' * 32: [-1.0, -2.5]}


@pytest.mark.slow
def test_a_damaged_conversion_of_a_gguf_model_is_rebuilt(smollm2_gguf, smollm2_local_dirs, tmp_path, capsys):
    """The converted-model cache: SmolLM2's conversion (this session's, copied under this test's cache root, where
    the same file maps to the same directory name) with its 538 MB model.safetensors cut in half. materialize_model
    reports it, converts the GGUF file again, and the new model.safetensors is byte for byte the clean one."""
    import hashlib
    import shutil
    from models import gguf_cache_dir, materialize_model
    _, clean = smollm2_local_dirs
    root = tmp_path / 'cache'
    target = gguf_cache_dir(smollm2_gguf, root)
    shutil.copytree(clean, target)
    cut_short(target / 'model.safetensors')
    capsys.readouterr()
    assert materialize_model(str(smollm2_gguf), root) == str(target)
    output = capsys.readouterr().out
    assert (f'{target}: damaged cache ({target}/model.safetensors is not a readable safetensors file (Error while '
            f'deserializing header: incomplete metadata, file not fully covered): it is truncated or damaged; '
            f'download or save the model again); rebuilding it') in output
    assert f'converting {smollm2_gguf} to a float32 Hugging Face model in {target} (once)' in output
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest(target / 'model.safetensors') == digest(clean / 'model.safetensors')
    assert [p.name for p in root.glob('gguf_models/.*')] == []  # the damaged copy set aside and removed
