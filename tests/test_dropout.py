"""Dropout is off everywhere in the policy and the reference (models.disable_dropout), as the original's
disable_dropout intends: DPO's log-ratios must be deterministic functions of the weights.

transformers 5's Llama, Qwen2 and GPT-NeoX attention modules copy `config.attention_dropout` into a float attribute
when they are built (`self.attention_dropout`, read as `dropout=0.0 if not self.training else self.attention_dropout`),
so zeroing the config afterwards changed nothing: with attention_dropout=0.5 a Llama policy in train mode against its
eval-mode reference gave a first DPO loss of 0.6957 instead of ln 2. Each architecture here is built from a config with
attention_dropout=0.5 (and hidden_dropout=0.5 where the config has it: GPT-NeoX's residual and embedding dropouts).
"""
import math

import pytest
import torch

from helpers import FAST, compose_config, start_run
from models import build_model

DPO = [*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=16']


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, attention_dropout=0.5)), 'LlamaDecoderLayer'


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, attention_dropout=0.5)), 'Qwen2DecoderLayer'


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return (GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, attention_dropout=0.5, hidden_dropout=0.5)), 'GPTNeoXLayer')


# 2 layers of width 64, the embedded model's 320-token vocabulary (its byte tokenizer is the run's tokenizer)
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=256, eos_token_id=256, pad_token_id=256)
ARCHITECTURES = {'llama': llama, 'qwen2': qwen2, 'gpt-neox': gpt_neox}


def overrides_of(architecture, directory):
    """The model.* overrides of a tiny random model of `architecture`, saved with its dropouts at 0.5."""
    torch.manual_seed(0)
    model, block = ARCHITECTURES[architecture]()
    model.save_pretrained(directory)
    return [f'model.name_or_path={directory}', 'model.tokenizer_name_or_path=embedded:tiny',
            f'model.block_name={block}']


@pytest.mark.parametrize('architecture', sorted(ARCHITECTURES))
def test_two_forward_passes_in_train_mode_give_the_same_logits(architecture, tmp_path):
    """build_model (train.py's loader) of a model saved with attention_dropout=0.5: in train mode two forward passes of
    the same 12 tokens give bitwise equal logits, and every float attribute named *dropout* is 0."""
    config = compose_config(overrides_of(architecture, tmp_path / architecture), tmp_path)
    model = build_model(config, 'float32', None).train()
    input_ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    rates = {f'{name}.{key}': value for name, module in model.named_modules() for key, value in vars(module).items()
             if 'dropout' in key and isinstance(value, float)}
    assert rates and set(rates.values()) == {0.0}


@pytest.mark.parametrize('architecture', sorted(ARCHITECTURES))
@pytest.mark.parametrize('lora', [False, True], ids=['reference-model', 'lora'])
def test_the_first_dpo_loss_is_ln_2(architecture, lora, tmp_path):
    """The first DPO batch, policy = reference (the model itself, or the LoRA policy with B = 0 and its adapters off):
    every margin h is 0 and the loss is −log σ(0) = ln 2 = 0.693147 to 1e-6 (0.6957 for the Llama before the fix)."""
    overrides = overrides_of(architecture, tmp_path / architecture)
    trainer = start_run([*DPO, *overrides, *(['lora.r=4', 'lora.alpha=8'] if lora else [])], tmp_path)
    trainer.policy.train()
    loss, metrics = trainer.get_batch_metrics(trainer.local(next(iter(trainer.train_batches()))), train=True)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert max(abs(m) for m in metrics['rewards_train/logratio_margins']) < 1e-5


def test_the_lora_reference_runs_in_eval_mode_and_the_policy_trains_on(tmp_path):
    """With LoRA the reference is the policy with its adapters off: during the reference's forward pass every module is
    in eval mode (so nothing that behaves differently in training, dropout or otherwise, reaches π_ref), and the
    policy is back in train mode afterwards."""
    trainer = start_run([*DPO, 'lora.r=4', 'lora.alpha=8', 'lora.dropout=0.5'], tmp_path)
    seen = []
    handle = trainer.policy.get_base_model().register_forward_pre_hook(lambda module, args: seen.append(
        {m.training for m in module.modules()}))
    trainer.policy.train()
    trainer.reference(trainer.local(next(iter(trainer.train_batches()))))
    handle.remove()
    assert seen == [{False}]
    assert {m.training for m in trainer.policy.modules()} == {True}
