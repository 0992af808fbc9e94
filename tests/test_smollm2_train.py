"""`python train.py model=smollm2` end to end on CPU, offline: SFT and DPO steps of the real SmolLM2-135M-Instruct
(its 4-bit GGUF copy, converted once) on the real UltraFeedback messages slice, with short sequences."""
import json
import math

import pytest
from helpers import run_dir_from_output, run_train

pytestmark = pytest.mark.slow

SMALL = ['exp_name=smollm2', 'wandb.enabled=false', 'sample_during_eval=false', 'n_examples=4', 'batch_size=2',
         'eval_batch_size=2', 'n_eval_examples=2', 'max_length=64', 'max_prompt_length=32', 'warmup_steps=0',
         'eval_every=1000', 'minimum_log_interval_secs=0']



def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_sft_steps(smollm2_local_dirs, ultrafeedback_messages, tmp_path):
    """model=smollm2 with HF_HUB_OFFLINE=1 (helpers.TRAIN_ENV) says it uses the GGUF copy and finds the conversion
    already made; two SFT steps of 2 examples. Every eval example keeps 32 response tokens (prompts cut to 32 of
    max_length 64), and the pretrained model gives them a log-probability far above a uniform model's
    32 · ln(1/49,152) = -346. The export hf_model/ carries the chat template."""
    root, _ = smollm2_local_dirs
    result = run_train(['model=smollm2', 'loss=sft', f'datasets=[{ultrafeedback_messages}]', f'local_dirs=[{root}]', *SMALL],
                       cwd=tmp_path)
    assert 'the Hub does not answer (HF_HUB_OFFLINE is set); using the GGUF copy' in result.stdout
    assert 'converting' not in result.stdout
    run_dir = run_dir_from_output(result.stdout)
    logged = metrics(run_dir)
    train = [m for m in logged if m['split'] == 'train']
    assert [m['counters/examples'] for m in train] == [2, 4] and all(math.isfinite(m['loss/train']) for m in train)
    first_eval = next(m for m in logged if m['split'] == 'eval')
    assert -32 * 5 < first_eval['logps_eval/chosen'] < 0
    assert (run_dir / 'hf_model' / 'chat_template.jinja').is_file()


def test_dpo_steps_from_a_gguf_path(smollm2_gguf, smollm2_local_dirs, ultrafeedback_messages, tmp_path):
    """model.name_or_path=<the .gguf file> works like the preset's Hub id offline (the same conversion, reused);
    the first DPO step, policy = reference, has loss ln 2 = 0.693147 and reward margin 0."""
    root, _ = smollm2_local_dirs
    result = run_train(['model=smollm2', f'model.name_or_path={smollm2_gguf}', 'loss=dpo', 'loss.beta=0.1',
                        f'datasets=[{ultrafeedback_messages}]', f'local_dirs=[{root}]', *SMALL], cwd=tmp_path)
    assert 'converting' not in result.stdout
    train = [m for m in metrics(run_dir_from_output(result.stdout)) if m['split'] == 'train']
    assert train[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]['rewards_train/margins'] == pytest.approx(0.0, abs=1e-5)
    assert len(train) == 2 and math.isfinite(train[1]['loss/train'])
