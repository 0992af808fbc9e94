"""FSDPTrainer with LoRA in 2 CPU processes (gloo, through `python train.py`) against BasicTrainer with LoRA.

The same data, seed and SGD steps give the same per-step losses (relative difference ≤ 1e-4: float32 sums in a
different order) and the same adapters in policy.pt and hf_model/adapter/ (to 1e-5): the adapters start alike on
every rank (rank 0 draws A from the seed, the empty ranks receive it), only they are sharded for the optimizer, and
the reference, the policy with its adapters off, is computed through the same sharded model.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, run_dir_from_output, run_train, train_in_process

pytestmark = pytest.mark.slow

# 4 SGD steps of 8 pairs of β-DPO with LoRA (r = 4) on the tiny model
ARGS = [*FAST, 'lora.r=4', 'lora.alpha=8', 'optimizer=SGD', 'lr=0.5', 'n_examples=32', 'eval_every=16',
        'minimum_log_interval_secs=0', 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2',
        'loss.a=0.6', 'n_cpu_processes=2']


def train_losses(run_dir):
    return [m['loss/train'] for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())
            if m['split'] == 'train']


def test_fsdp_with_lora_gives_basic_trainers_losses_and_adapters(tmp_path):
    basic = train_in_process([*ARGS, 'exp_name=basic'], tmp_path)
    fsdp = run_dir_from_output(run_train([*ARGS, 'exp_name=fsdp', 'trainer=FSDPTrainer', f'local_dirs=[{tmp_path}]'],
                                         cwd=tmp_path).stdout)
    assert len(train_losses(basic)) == 4
    assert train_losses(fsdp) == pytest.approx(train_losses(basic), rel=1e-4)
    assert train_losses(basic)[-1] != pytest.approx(train_losses(basic)[0], rel=1e-3)

    basic_state, fsdp_state = (torch.load(run / 'LATEST' / 'policy.pt', weights_only=True) for run in (basic, fsdp))
    assert basic_state['lora'] == fsdp_state['lora']
    assert set(fsdp_state['state']) == set(basic_state['state']) and len(basic_state['state']) == 32
    for name, value in basic_state['state'].items():
        torch.testing.assert_close(fsdp_state['state'][name], value, rtol=0, atol=1e-5)
    basic_adapter, fsdp_adapter = (load_file(run / 'hf_model' / 'adapter' / 'adapter_model.safetensors')
                                   for run in (basic, fsdp))
    assert set(fsdp_adapter) == set(basic_adapter)
    for name, value in basic_adapter.items():
        torch.testing.assert_close(fsdp_adapter[name], value, rtol=0, atol=1e-5)
