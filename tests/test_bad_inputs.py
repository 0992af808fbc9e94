"""Every bad input is answered with a clear message, and nothing already on disk changes.

Each row runs what `python train.py OVERRIDES` runs up to its first training batch (helpers.start_run:
validation, run directory, models, archive / resume, tokenizer check, data) against a directory that
already holds a real earlier run (config, checkpoint, LATEST), the embedded model and a tokenized data
cache. After each row every one of those files is byte-identical with the same modification time; a
row refused by validation leaves no new file at all, a later one at most the new run's config.yaml
(and the tokenization cache of data that was fine).
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, List, NamedTuple

import pytest
import torch
from conftest import hh_row
from hydra.errors import MissingConfigException

from helpers import FAST, Evil, run_dir_from_output, run_train, start_run
from models import build_byte_tokenizer, materialize_embedded_model


class Case(NamedTuple):
    name: str
    overrides: Callable[[Path, Path], List[str]]  # (this case's scratch directory, the earlier run) → overrides
    error: type
    message: str  # exact text expected in the error message
    validation: bool = False  # refused before anything is written


def hh_files(directory: Path, text: bytes) -> List[str]:
    """datasets=[hh:DIRECTORY] whose train.jsonl and test.jsonl both hold `text`."""
    directory.mkdir(exist_ok=True)
    for split in ('train', 'test'):
        (directory / f'{split}.jsonl').write_bytes(text)
    return [f'datasets=[hh:{directory}]']


def jsonl(rows) -> bytes:
    return ''.join(json.dumps(row) + '\n' for row in rows).encode()


GOOD_ROWS = [hh_row([f'Question {i}?'], f' Answer {i}.', ' No.') for i in range(16)]


def truncated_archive(scratch: Path, previous_run: Path) -> List[str]:
    data = (previous_run / 'LATEST' / 'policy.pt').read_bytes()
    (scratch / 'policy.pt').write_bytes(data[:len(data) // 2])
    return [f'model.archive={scratch}/policy.pt']


def archive_of_another_model(scratch: Path, previous_run: Path) -> List[str]:
    """The policy.pt of a 6-layer GPT-NeoX (the embedded tiny model has 4)."""
    from transformers import AutoConfig, GPTNeoXForCausalLM
    config = AutoConfig.from_pretrained(materialize_embedded_model('embedded:tiny', previous_run.parent))
    config.num_hidden_layers = 6
    torch.save({'step_idx': 0, 'state': GPTNeoXForCausalLM(config).state_dict(), 'metrics': {}}, scratch / 'policy.pt')
    return [f'model.archive={scratch}/policy.pt']


def malicious_archive(scratch: Path, previous_run: Path) -> List[str]:
    torch.save({'step_idx': 0, 'state': Evil(scratch / 'pwned'), 'metrics': {}}, scratch / 'policy.pt')
    return [f'model.archive={scratch}/policy.pt']


def bigger_tokenizer(scratch: Path, previous_run: Path) -> List[str]:
    """A tokenizer of 357 tokens (the byte tokenizer + 100) for a model that embeds 320."""
    tokenizer = build_byte_tokenizer()
    tokenizer.add_tokens([f'<extra_{i}>' for i in range(100)])
    tokenizer.save_pretrained(scratch / 'tokenizer')
    return [f'model.tokenizer_name_or_path={scratch}/tokenizer']


def pairs_with_a_test_prompt(scratch: Path, previous_run: Path) -> List[str]:
    """synthetic.train_pairs whose second row is the first test prompt ('reverse nhyi')."""
    rows = [{'prompt': '\n\nHuman: reverse cab\n\nAssistant:', 'chosen': ' bac', 'rejected': ' bc'},
            {'prompt': '\n\nHuman: reverse nhyi\n\nAssistant:', 'chosen': ' iyhn', 'rejected': ' nhyi'}]
    (scratch / 'pairs.jsonl').write_bytes(jsonl(rows))
    return ['loss=dpo', 'loss.beta=0.1', f'synthetic.train_pairs={scratch}/pairs.jsonl']


def not_a_directory(scratch: Path, previous_run: Path) -> List[str]:
    """local_dirs below a regular file: unwritable even for root (who ignores permission bits)."""
    (scratch / 'a_file').write_text('x')
    return [f'local_dirs=[{scratch}/a_file/runs]']


def model_directory(scratch: Path, previous_run: Path, tokenizer: bool = True) -> Path:
    """A copy of the embedded tiny model's directory (config.json, model.safetensors, and the tokenizer files)."""
    import shutil
    source = Path(materialize_embedded_model('embedded:tiny', previous_run.parent))
    target = scratch / 'model'
    target.mkdir()
    for f in source.iterdir():
        if tokenizer or not f.name.startswith('tokenizer'):
            shutil.copy(f, target / f.name)
    return target


def blank_model(directory: Path) -> List[str]:
    return ['model=blank_model', f'model.name_or_path={directory}', 'model.block_name=GPTNeoXLayer', 'exp_name=blank']


# Python that a model directory asks transformers to import; it would leave the marker `pwned` if it ever ran.
CUSTOM_CODE = """open({marker!r}, 'w').write('this code ran')
from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast
class CustomForCausalLM(GPTNeoXForCausalLM):
    pass
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def asks_to_run_code(scratch: Path, previous_run: Path, file_name: str = 'config.json') -> List[str]:
    """A model directory whose config.json (or tokenizer_config.json) names code in the directory (auto_map)."""
    directory = model_directory(scratch, previous_run)
    (directory / 'custom.py').write_text(CUSTOM_CODE.format(marker=str(scratch / 'pwned')))
    settings = json.loads((directory / file_name).read_text())
    settings['auto_map'] = ({'AutoModelForCausalLM': 'custom.CustomForCausalLM'} if file_name == 'config.json'
                            else {'AutoTokenizer': [None, 'custom.CustomTokenizer']})
    (directory / file_name).write_text(json.dumps(settings))
    return blank_model(directory)


def damaged_weights(scratch: Path, previous_run: Path, damage: Callable[[bytes], bytes]) -> List[str]:
    directory = model_directory(scratch, previous_run)
    weights = directory / 'model.safetensors'
    weights.write_bytes(damage(weights.read_bytes()))
    return blank_model(directory)


def config_not_json(scratch: Path, previous_run: Path) -> List[str]:
    directory = model_directory(scratch, previous_run)
    (directory / 'config.json').write_text('{"model_type": "gpt_neox", ')
    return blank_model(directory)


CASES = [
    # --- config values -------------------------------------------------------------------------------
    Case('negative beta', lambda s, p: ['loss=dpo', 'loss.beta=-0.1'], ValueError,
         'loss.beta=-0.1 must be a positive number (e.g. loss.beta=0.1)', True),
    Case('non-numeric beta', lambda s, p: ['loss=dpo', 'loss.beta=high'], ValueError,
         "loss.beta='high' must be a positive number (e.g. loss.beta=0.1)", True),
    Case('mode_weight >= 1', lambda s, p: ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO',
                                           'loss.mode_weight=1.0'], ValueError,
         'loss.mode_weight=1.0 (ρ, the fraction of pairs the filter drops) must be a number in [0, 1)', True),
    Case('no beta', lambda s, p: ['loss=dpo'], ValueError,
         'missing values for: loss.beta (set them on the command line, e.g. loss.beta=...)', True),
    Case('FSDP without a block name', lambda s, p: ['trainer=FSDPTrainer', 'model.block_name=null'], ValueError,
         'model.block_name is null, but trainer=FSDPTrainer (it shards the model block by block) needs the class name '
         'of a transformer block; set e.g. model.block_name=GPTNeoXLayer', True),
    Case('batch size not divisible', lambda s, p: ['batch_size=6', 'gradient_accumulation_steps=4'], ValueError,
         'batch_size=6 must be divisible by gradient_accumulation_steps (4) × processes (1) = 4', True),
    Case('unknown trainer', lambda s, p: ['trainer=DDPTrainer'], ValueError,
         "trainer='DDPTrainer' is unknown; choose one of BasicTrainer, FSDPTrainer, TensorParallelTrainer", True),
    Case('unknown loss mode', lambda s, p: ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_dpo'], ValueError,
         "loss.mode_loss='beta_dpo' is unknown; use mean (the plain loss), beta_DPO or epsilon_DPO", True),
    Case('unknown loss', lambda s, p: ['loss=orpo'], MissingConfigException,
         "Could not find 'loss/orpo'\n\nAvailable options in 'loss':\n\tdpo\n\tipo\n\tkto\n\tsft\n\tsimpo", True),
    Case('non-numeric lr', lambda s, p: ['lr=fast'], ValueError, "lr='fast' must be a positive number", True),
    Case('unknown on_nonfinite', lambda s, p: ['on_nonfinite=ignore'], ValueError,
         "on_nonfinite='ignore' is unknown; choose one of stop, skip", True),
    Case('zero length buckets', lambda s, p: ['length_bucket_batches=0'], ValueError,
         'length_bucket_batches=0 must be a positive integer (e.g. 50) or null', True),
    Case('prompt longer than the sequence', lambda s, p: ['max_prompt_length=96'], ValueError,
         'max_prompt_length=96 must be smaller than max_length=96', True),
    # --- files ---------------------------------------------------------------------------------------
    Case('missing archive', lambda s, p: [f'model.archive={s}/policy.pt'], ValueError,
         'does not exist; pass the policy.pt of an SFT run (RUN_DIR/LATEST/policy.pt)', True),
    Case('truncated archive', truncated_archive, ValueError,
         'it is truncated or not a torch checkpoint. Use an earlier checkpoint (step-N/) of the same run.'),
    Case('archive of another model', archive_of_another_model, ValueError,
         'does not fit the model (GPTNeoXForCausalLM):\n  unexpected keys: gpt_neox.layers.4.attention.dense.bias'),
    Case('malicious archive', malicious_archive, ValueError,
         'contains Python objects other than tensors and was refused (loaded with weights_only=True, nothing in it '
         'ran)'),
    Case('unwritable local_dirs', not_a_directory, ValueError,
         'a_file/runs (the first that exists, else the last); set local_dirs=[a directory you can write to]', True),
    Case('resume from a directory without checkpoint', lambda s, p: [f'resume_from={s}'], ValueError,
         'has no complete checkpoint (no LATEST/policy.pt); pass the run directory of an earlier run', True),
    Case('resume with other settings', lambda s, p: [f'resume_from={p}', 'lr=0.5', 'seed=3'], ValueError,
         'the run was started with different settings, so it cannot continue exactly:\n'
         '  - lr: was 0.003, now 0.5\n  - seed: was 0, now 3', True),
    Case('non-positive collective timeout', lambda s, p: ['collective_timeout_secs=0'], ValueError,
         'collective_timeout_secs=0 (seconds) must be a positive number, or null', True),
    Case('negative precompute save interval', lambda s, p: ['precompute_save_every_secs=-1'], ValueError,
         'precompute_save_every_secs=-1 (seconds) must be a number ≥ 0', True),
    Case('trust_remote_code not a boolean', lambda s, p: ['trust_remote_code=maybe'], ValueError,
         "trust_remote_code='maybe' must be true or false", True),
    # --- model directories ---------------------------------------------------------------------------
    Case('model directory without a tokenizer', lambda s, p: blank_model(model_directory(s, p, tokenizer=False)),
         ValueError, '/model holds no tokenizer files (none of tokenizer.json, tokenizer_config.json, vocab.json, '
         'vocab.txt, merges.txt, tokenizer.model, spiece.model, sentencepiece.bpe.model, tekken.json); set '
         'model.tokenizer_name_or_path to the tokenizer the model was trained with', True),
    Case('model directory asking to run its code', asks_to_run_code, ValueError,
         '/model: its config.json asks to run Python code from the directory (auto_map: AutoModelForCausalLM), which '
         'is refused. If you trust that code, set trust_remote_code=true', True),
    Case('tokenizer asking to run its code', lambda s, p: asks_to_run_code(s, p, 'tokenizer_config.json'), ValueError,
         '/model: its tokenizer_config.json asks to run Python code from the directory (auto_map: AutoTokenizer), '
         'which is refused.', True),
    Case('truncated safetensors', lambda s, p: damaged_weights(s, p, lambda data: data[:len(data) // 2]), ValueError,
         '/model/model.safetensors is not a readable safetensors file (Error while deserializing header: incomplete '
         'metadata, file not fully covered): it is truncated or damaged; download or save the model again', True),
    Case('garbage safetensors', lambda s, p: damaged_weights(s, p, lambda data: b'\xff' * 4096), ValueError,
         '/model/model.safetensors is not a readable safetensors file (Error while deserializing header: header too '
         'large): it is truncated or damaged', True),
    Case('config.json not JSON', config_not_json, ValueError,
         '/model/config.json is not valid JSON; copy or save the model again', True),
    # --- tokenizer -----------------------------------------------------------------------------------
    Case('tokenizer larger than the vocabulary', bigger_tokenizer, ValueError,
         'has 357 tokens but the model embedded:tiny embeds only 320: they do not belong together'),
    # --- data ----------------------------------------------------------------------------------------
    Case('unknown dataset', lambda s, p: ['datasets=[hhh]'], ValueError, "Unknown dataset 'hhh'. Valid: hh, shp, se"),
    Case('missing columns', lambda s, p: hh_files(s / 'd', jsonl([{'question': 'q', 'answer': 'a'}] * 4)), ValueError,
         "missing columns ['chosen', 'rejected'] (found ['answer', 'question'])"),
    Case('wrong types', lambda s, p: hh_files(s / 'd', jsonl(GOOD_ROWS[:3] + [{'chosen': 3, 'rejected': 'x'}])),
         ValueError, "test.jsonl row 4: 'chosen' must be a string, got int 3"),
    Case('empty file', lambda s, p: hh_files(s / 'd', b'\n\n'), ValueError, 'test.jsonl: the file is empty'),
    Case('non-UTF-8 bytes', lambda s, p: hh_files(s / 'd', jsonl(GOOD_ROWS[:2]) + b'{"chosen": "caf\xe9"}\n'),
         ValueError, 'test.jsonl: not UTF-8 text (invalid byte at offset'),
    Case('prompts without Assistant:', lambda s, p: hh_files(
        s / 'd', jsonl([{'chosen': f'\n\nHuman: hi {i}', 'rejected': f'\n\nHuman: hi {i}'} for i in range(8)])),
         ValueError, "test.jsonl: 8 of 8 rows are unusable: 8 no '\\n\\nAssistant:' in chosen (rows 1, 2, 3, 4, 5, ...)"),
    Case('missing pairs file', lambda s, p: ['loss=dpo', 'loss.beta=0.1', f'synthetic.train_pairs={s}/pairs.jsonl'],
         ValueError, 'pairs.jsonl does not exist; write it with `python scripts/sample_pairs.py SFT_RUN_DIR --out', True),
    Case('test prompt in the pairs file', pairs_with_a_test_prompt, ValueError,
         'pairs.jsonl row 2: \'\\n\\nHuman: reverse nhyi\\n\\nAssistant:\' is a test prompt of the synthetic task'),
    Case('too few examples for a batch', lambda s, p: hh_files(s / 'd', jsonl(GOOD_ROWS[:5])), ValueError,
         'examples, fewer than one batch of 8'),
]


def snapshot(root: Path) -> dict:
    """{relative path: (sha256, mtime) of a file | ('link', target) | 'dir'} of everything under root."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = ('link', os.readlink(path))
            elif path.is_dir():
                entries[key] = 'dir'
            else:
                entries[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return entries


@pytest.fixture(scope='module')
def earlier_run(tmp_path_factory):
    """(local_dirs root, an earlier run's directory with a real checkpoint, snapshot of everything there)."""
    root = tmp_path_factory.mktemp('local_dirs')
    trainer = start_run([*FAST, 'loss=sft'], root)
    trainer.save()
    return root, trainer.run_dir, snapshot(root)


def test_the_table_has_at_least_20_rows():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_message_and_changes_nothing(case, earlier_run, tmp_path):
    root, previous_run, original = earlier_run
    overrides = case.overrides(tmp_path, previous_run)
    before = snapshot(root)
    with pytest.raises(case.error) as info:
        start_run([*FAST, *overrides], root)
    assert case.message in str(info.value), str(info.value)
    after = snapshot(root)
    changed = [path for path, state in original.items() if after.get(path) != state]
    assert not changed, f'{case.name} changed {changed}'
    new = sorted(set(after) - set(before))
    if case.validation:
        assert not new, f'{case.name} wrote {new}'
    else:  # at most the new run directory, its config.yaml, and the tokenization cache of good data
        assert all(after[p] == 'dir' or p.endswith('/config.yaml') or '/tokenized/' in p for p in new), new
        assert len([p for p in new if after[p] == 'dir']) <= 1, new
    assert not (tmp_path / 'pwned').exists()


def test_a_single_enormous_row_is_cut_before_tokenizing(tmp_path):
    """One HH row with a 5,000,000-character prompt among 15 normal ones: the run goes on (no minutes of
    tokenizing, no gigabytes), and that prompt's 64 tokens (max_prompt_length, HH keeps the end) are
    exactly those of its tail 'xx…xEND\\n\\nAssistant:', as if the whole text had been tokenized."""
    import preference_datasets
    tokenizer = build_byte_tokenizer()
    long_prompt_rows = [hh_row(['x' * 5_000_000 + 'END'], ' a', ' b')]
    hh_files(tmp_path / 'd', jsonl(GOOD_ROWS[:15] + long_prompt_rows))
    batch = next(preference_datasets.get_batch_iterator(
        [f'hh:{tmp_path}/d'], tokenizer, split='test', batch_size=16, shuffle=False, n_epochs=1, max_length=96,
        max_prompt_length=64, silent=True, cache_dir=str(tmp_path / 'cache')))
    i = next(k for k, p in enumerate(batch['prompt']) if p.endswith('END\n\nAssistant:'))
    prompt_ids = batch['prompt_input_ids'][i][batch['prompt_attention_mask'][i].bool()].tolist()
    assert prompt_ids == tokenizer('x' * 49 + 'END\n\nAssistant:')['input_ids']
    assert len(prompt_ids) == 64


@pytest.mark.slow
def test_a_run_refused_after_validation_leaves_no_run_directory(earlier_run, tmp_path):
    """`python train.py` with a truncated archive: validation passes (the file exists), the run directory with
    its config.yaml is written, then loading the archive fails; the directory is removed again, nothing else
    under local_dirs changes, and the message says why."""
    root, previous_run, original = earlier_run
    overrides = truncated_archive(tmp_path, previous_run)
    result = run_train([*FAST, f'local_dirs=[{root}]', 'exp_name=refused', *overrides], cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert 'it is truncated or not a torch checkpoint' in result.stderr
    run_dir = run_dir_from_output(result.stdout)
    assert f'removed the run directory {run_dir}' in result.stdout and not run_dir.exists()
    assert all(snapshot(root).get(path) == state for path, state in original.items())
    assert not any('refused' in path for path in snapshot(root))


@pytest.mark.slow
def test_trust_remote_code_true_lets_the_directory_code_run(earlier_run, tmp_path):
    """The control of 'model directory asking to run its code': with trust_remote_code=true the same directory
    passes validation and its code runs when the model is built (in a child process whose HF_HOME, where
    transformers copies such code, is a scratch directory)."""
    import subprocess
    import sys
    from helpers import ROOT
    overrides = [*FAST, *asks_to_run_code(tmp_path, earlier_run[1]), 'trust_remote_code=true']
    script = ('import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]\n'
              'import train, models, helpers\n'
              'config = helpers.compose_config(sys.argv[3:], sys.argv[2])\n'
              'assert train.validate_config(config) == [], train.validate_config(config)\n'
              'print(type(models.build_model(config, "float32", None)).__name__)\n')
    result = subprocess.run([sys.executable, '-c', script, str(ROOT), str(tmp_path / 'local'), *overrides],
                            capture_output=True, text=True,
                            env={**os.environ, 'HF_HOME': str(tmp_path / 'hf_home'), 'HF_HUB_OFFLINE': '1'},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == 'CustomForCausalLM'
    assert (tmp_path / 'pwned').read_text() == 'this code ran'
