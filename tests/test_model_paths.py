"""A model path that does not exist is named as such before anything loads (models.missing_model_reason), in train.py
(model.name_or_path, model.tokenizer_name_or_path) and evaluate.py (model=, reference=), instead of transformers'
chained OSError about repo ids after a minute of retrying the Hub."""
import os
import subprocess
import sys
import time

import pytest

from eval_helpers import eval_config
from evaluate import evaluate
from helpers import FAST, ROOT, TRAIN_ENV, start_run
from models import model_directory_problems
from utils import UserError

MISSING = 'no such directory, and not a Hub id'
ADVICE = ('pass a model directory (written by save_pretrained), a .gguf file, embedded:NAME or a Hub id such as '
          'EleutherAI/pythia-2.8b')


@pytest.mark.parametrize('value', ['/no/such/model_dir', './model', '../models/m', 'runs/x/hf_model', '~/no_such_dir/m'])
def test_a_path_that_is_neither_a_directory_nor_a_hub_id_is_named(value):
    assert model_directory_problems(value, None, False) == [f'model.name_or_path={value}: {MISSING}; {ADVICE}']


def test_the_tokenizer_path_is_checked_too_and_hub_ids_are_left_to_the_hub(tmp_path):
    """A missing tokenizer directory is named under its own key; names shaped as Hub ids ('gpt2', 'org/model'), the
    embedded models and existing directories are no such problem (a Hub id is resolved by from_pretrained)."""
    assert model_directory_problems('embedded:tiny', '/no/such/tokenizer', False) == [
        f'model.tokenizer_name_or_path=/no/such/tokenizer: {MISSING}; {ADVICE}']
    for value in ('gpt2', 'EleutherAI/pythia-2.8b', 'embedded:tiny'):
        assert model_directory_problems(value, None, False) == []
    assert model_directory_problems(str(tmp_path / 'absent.gguf'), None, False) == [
        f'model.name_or_path={tmp_path}/absent.gguf: no such GGUF file']


def test_train_refuses_a_missing_model_directory_at_once(tmp_path, monkeypatch):
    """What `python train.py model.name_or_path=runs/x/hf_model` runs: an error naming the key, raised by the
    validation (train.validate_config, through model_directory_problems) before any model, tokenizer or run directory
    exists; with the Hub allowed (no HF_HUB_OFFLINE) it takes
    no Hub round trips (measured: 0.7 s, the validation included; transformers retried the Hub for 51 s before)."""
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.chdir(tmp_path)
    start = time.time()
    with pytest.raises(ValueError) as info:
        start_run([*FAST, 'model.name_or_path=runs/x/hf_model'], tmp_path)
    assert f'model.name_or_path=runs/x/hf_model: {MISSING}' in str(info.value)
    assert time.time() - start < 20
    assert not (tmp_path / 'runs').exists()


def test_evaluate_names_a_missing_model_and_reference(tmp_path):
    with pytest.raises(UserError) as info:
        evaluate(eval_config(['model=/no/such/model_dir', 'reference=runs/x/hf_model', f'out={tmp_path / "out"}'],
                             tmp_path))
    assert f'model=/no/such/model_dir: {MISSING}' in str(info.value)
    assert f'reference=runs/x/hf_model: {MISSING}' in str(info.value)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_python_evaluate_exits_with_status_2_and_the_message_alone(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / 'evaluate.py'), 'model=/no/such/model_dir',
                             f'out={tmp_path / "out"}', f'local_dirs=[{tmp_path}]'], cwd=tmp_path,
                            env=dict(os.environ, **TRAIN_ENV), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(f'error: invalid config:\n  - model=/no/such/model_dir: {MISSING}; {ADVICE}')
    assert 'Traceback' not in result.stderr
