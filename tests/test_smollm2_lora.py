"""LoRA on the real SmolLM2-135M-Instruct (its GGUF copy, converted once by the project's setup path): two β-DPO steps
on the real UltraFeedback messages slice with short sequences, the checkpoint, and the merged export."""
import json
import math

import pytest
import torch

from helpers import train_in_process

pytestmark = pytest.mark.slow



def test_beta_dpo_steps_with_lora(smollm2_gguf, smollm2_local_dirs, ultrafeedback_messages):
    """Two β-DPO steps of 2 pairs (max_length 64), lora.r=8 on the 7 projections of each of the 30 Llama blocks:
    per block q 8·576 + 576·8 = 9,216, k and v 8·576 + 192·8 = 6,144 each, o 9,216, gate, up and down
    8·576 + 1,536·8 = 16,896 each: 81,408, so 2,442,240 trained values, all that policy.pt holds (the model has
    134,515,008). The first loss is ln 2 (B = 0: policy = reference), the second differs; the merged hf_model/
    gives the logits of the base model with the PEFT adapter of hf_model/adapter/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    root, converted = smollm2_local_dirs
    run_dir = train_in_process([
        'model=smollm2', f'model.name_or_path={smollm2_gguf}', 'exp_name=smollm2_lora', f'local_dirs=[{root}]',
        f'datasets=[{ultrafeedback_messages}]', 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO',
        'loss.mode_weight=0.2', 'loss.a=0.6', 'lora.r=8', 'lora.alpha=16', 'optimizer=AdamW', 'lr=1e-3',
        'wandb.enabled=false', 'sample_during_eval=false', 'n_examples=4', 'batch_size=2', 'eval_batch_size=2',
        'n_eval_examples=2', 'max_length=64', 'max_prompt_length=32', 'warmup_steps=0', 'eval_every=1000',
        'minimum_log_interval_secs=0'], root)
    train = [m for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines()) if m['split'] == 'train']
    assert train[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(train[1]['loss/train']) and train[1]['loss/train'] != pytest.approx(math.log(2), abs=1e-5)
    saved = torch.load(run_dir / 'LATEST' / 'policy.pt', weights_only=True)
    assert sum(t.numel() for t in saved['state'].values()) == 2_442_240
    assert saved['lora']['target_modules'] == ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj',
                                               'v_proj']
    input_ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run_dir / 'hf_model')(input_ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(converted),
                                            run_dir / 'hf_model' / 'adapter')(input_ids).logits
    # W + (α/r)·B·A merged into one matrix rounds differently from the two products added: float32 relative error
    #   through 30 layers, on logits of magnitude ~10-30 (measured: at most 1.5e-4 absolute, 6e-5 relative)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
