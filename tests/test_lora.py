"""LoRA (lora.r > 0): the adapted modules per architecture, the first DPO-family losses, the reference as the policy
with its adapters off, what trains and what a checkpoint holds, the merged export, and the config checks.

Everything runs in this process on the embedded tiny GPT-NeoX (0.9M parameters) or a 2-layer random Llama / GPT-2,
a few SGD steps each.
"""
import math

import pytest
import torch

from helpers import FAST, compose_config, save_tiny_llama, start_run
from lora import default_target_modules
from models import build_model
from train import validate_config

# r = 4, α = 8: the adapters' output is scaled by 2. A large SGD step so the adapters move measurably.
LORA = [*FAST, 'lora.r=4', 'lora.alpha=8', 'optimizer=SGD', 'lr=0.5', 'n_examples=24']
DPO = ['loss=dpo', 'loss.beta=0.1']


def tiny_llama(directory):
    """The overrides of helpers.save_tiny_llama's model."""
    return ['model.block_name=LlamaDecoderLayer', f'model.name_or_path={save_tiny_llama(directory)}',
            'model.tokenizer_name_or_path=embedded:tiny']


def save_tiny_gpt2(directory):
    """A 2-layer GPT-2: its projections are Conv1D (a Linear with a transposed weight)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=256,
                        eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return ['model.block_name=GPT2Block', f'model.name_or_path={directory}', 'model.tokenizer_name_or_path=embedded:tiny']


ARCHITECTURES = {'gpt-neox': lambda directory: [], 'llama': tiny_llama, 'gpt2': save_tiny_gpt2}


@pytest.mark.parametrize('architecture, expected', [
    ('gpt-neox', ['query_key_value', 'dense', 'dense_h_to_4h', 'dense_4h_to_h']),
    ('llama', ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']),
    ('gpt2', ['c_attn', 'c_proj', 'c_fc']),
])
def test_the_default_targets_are_the_attention_and_mlp_projections(architecture, expected, tmp_path):
    config = compose_config(ARCHITECTURES[architecture](tmp_path / architecture), tmp_path)
    model = build_model(config, 'float32', None)
    assert default_target_modules(model) == expected


@pytest.mark.parametrize('overrides, expected', [
    ([], math.log(2)),                                                              # DPO: −log σ(0)
    (['loss.label_smoothing=0.1'], math.log(2)),                                   # cDPO: −0.9·log σ(0) − 0.1·log σ(0)
    (['loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6'], math.log(2)),  # β-DPO, kept pairs
    (['loss=ipo'], 25.0),                                                           # IPO: (0 − 1/(2·0.1))²
], ids=['dpo', 'cdpo', 'beta-dpo', 'ipo'])
@pytest.mark.slow
def test_the_first_loss_is_that_of_policy_equal_to_reference(overrides, expected, tmp_path):
    """B starts at zero, so the policy is exactly the reference and every margin h is 0: DPO, cDPO and β-DPO give
    ln 2 = 0.693147, IPO with β = 0.1 gives (1/(2β))² = 25. No reference model is built."""
    trainer = start_run([*LORA, *DPO, *overrides], tmp_path)
    assert trainer.reference.model is trainer.policy
    batch = trainer.local(next(iter(trainer.train_batches())))
    loss, metrics = trainer.get_batch_metrics(batch, train=True)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics['rewards_train/logratio_margins'] == [0.0] * 8


@pytest.mark.slow
def test_the_reference_is_the_policy_with_its_adapters_off(tmp_path):
    """After 2 steps the adapters are non-zero: the policy's log-probabilities have moved (by more than 0.01 nats
    somewhere), while the reference's equal those of a separately loaded frozen copy of the model to 1e-5."""
    trainer = start_run([*LORA, *DPO], tmp_path)
    for batch, _ in zip(trainer.train_batches(), range(2)):
        trainer.train_step(batch)
    batch = trainer.local(next(iter(trainer.train_batches())))
    frozen = build_model(trainer.config, 'float32', None).eval()
    with torch.no_grad():
        separate = trainer.concatenated_forward(frozen, batch)
        policy = trainer.concatenated_forward(trainer.policy, batch)
    reference = trainer.reference(batch)
    for ours, theirs, moved in zip(reference, separate, policy):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        assert (moved - theirs).abs().max() > 1e-2


@pytest.mark.slow
def test_only_the_adapters_train_and_the_checkpoint_holds_only_them(tmp_path):
    """2 AdamW steps (weight decay 0.01 included): every one of the 32 adapter tensors changes (4 layers × 4
    projections × A, B), every base weight stays bitwise the same, and the optimizer keeps state for the adapters
    only. policy.pt holds the 32,768 adapter values: per layer with r = 4, query_key_value 4·128 + 384·4, dense
    4·128 + 128·4, dense_h_to_4h 4·128 + 512·4, dense_4h_to_h 4·512 + 128·4 = 8,192, × 4 layers; the model has
    908,032 − 32,768 = 875,264."""
    trainer = start_run([*LORA, *DPO, 'optimizer=AdamW', 'lr=1e-2'], tmp_path)
    before = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    for batch, _ in zip(trainer.train_batches(), range(2)):
        trainer.train_step(batch)
    after = dict(trainer.policy.named_parameters())
    adapters = {name for name in after if '.lora_' in name}
    assert len(adapters) == 32
    for name, value in before.items():
        assert torch.equal(value, after[name]) != (name in adapters), name
    assert {id(p) for p in trainer.optimizer.state} == {id(after[name]) for name in adapters}

    trainer.save()
    saved = torch.load(trainer.run_dir / 'LATEST' / 'policy.pt', weights_only=True)
    assert set(saved['state']) == adapters
    assert sum(t.numel() for t in saved['state'].values()) == 32_768
    assert sum(p.numel() for p in trainer.policy.parameters()) == 908_032
    assert saved['lora'] == {'r': 4, 'alpha': 8, 'target_modules': ['dense', 'dense_4h_to_h', 'dense_h_to_4h',
                                                                      'query_key_value'],
                             'fan_in_fan_out': False, 'base_model': 'embedded:tiny', 'base_archive': None}


@pytest.mark.parametrize('architecture', ['llama', 'gpt2'])
@pytest.mark.slow
def test_the_export_is_the_merged_policy_and_its_adapter(architecture, tmp_path):
    """2 DPO steps, then hf_model/: loaded with plain from_pretrained (no peft) it gives the policy's logits, and
    so does the base model with hf_model/adapter/ loaded by peft (to 1e-5); the logits moved from the base model's.
    Llama: tied embeddings and grouped key/value heads; GPT-2: Conv1D projections (the merge transposes B·A)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    overrides = ARCHITECTURES[architecture](tmp_path / architecture)
    trainer = start_run([*LORA, *DPO, *overrides], tmp_path)
    for batch, _ in zip(trainer.train_batches(), range(2)):
        trainer.train_step(batch)
    trainer.export_pretrained(tmp_path / 'hf')
    input_ids = next(iter(trainer.train_batches()))['chosen_input_ids']
    trainer.policy.eval()
    with torch.no_grad():
        expected = trainer.policy(input_ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')(input_ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / architecture)
        base_logits = base(input_ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / 'hf' / 'adapter')(input_ids).logits
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(adapted, expected, rtol=0, atol=1e-5)
    assert (base_logits - expected).abs().max() > 1e-3
    with safe_open(tmp_path / 'hf' / 'model.safetensors', 'pt') as f:
        assert not [key for key in f.keys() if 'lora' in key or 'base_layer' in key]


def test_lora_settings_are_checked_before_anything_loads(tmp_path):
    config = compose_config(['lora.r=-1'], tmp_path)
    assert validate_config(config) == ["lora.r=-1 must be a non-negative integer: the adapters' rank (e.g. "
                                       "lora.r=16), 0 for no LoRA"]
    config = compose_config(['lora.r=8', 'lora.alpha=0', 'lora.dropout=1.0', 'lora.target_modules=q_proj',
                             'trainer=TensorParallelTrainer'], tmp_path)
    assert validate_config(config) == [
        'lora.alpha=0 (α; the adapters are scaled by α/r) must be a positive number',
        'lora.dropout=1.0 must be a number in [0, 1)',
        "lora.target_modules='q_proj' must be null (the attention and MLP projections) or a non-empty list of module "
        "names, e.g. lora.target_modules=[q_proj,v_proj]",
        "lora.r > 0 does not work with trainer=TensorParallelTrainer (its plan splits the plain model's layers, not "
        "LoRA's wrapped ones); use trainer=FSDPTrainer or BasicTrainer, or lora.r=0"]


def test_target_modules_the_model_lacks_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"lora.target_modules=\['q_proj', 'dense'\]: \['q_proj'\] name no linear "
                                         r"layer of GPTNeoXForCausalLM; its linear layers are \['dense', "
                                         r"'dense_4h_to_h', 'dense_h_to_4h', 'lm_head', 'query_key_value'\]"):
        start_run([*LORA, 'lora.target_modules=[q_proj,dense]'], tmp_path)
