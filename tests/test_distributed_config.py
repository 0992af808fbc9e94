"""Distributed settings that fail early with a message, and the tensor-parallel plan, without processes."""
import pytest
import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import FAST, compose_config
from train import validate_config
from checkpoints import optimizer_state_by_index, optimizer_state_by_name
from distributed import tensor_parallel_plan


def test_basic_trainer_under_a_launcher_with_several_processes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    problems = validate_config(compose_config([*FAST, 'trainer=BasicTrainer'], tmp_path))
    assert len(problems) == 1 and 'trainer=BasicTrainer runs in one process' in problems[0]
    assert validate_config(compose_config([*FAST, 'trainer=FSDPTrainer'], tmp_path)) == []


def tiny_neox(**overrides):
    with torch.device('meta'):
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, **overrides))


def test_gpt_neox_plan_splits_attention_mlp_and_head():
    """4 patterns from GPTNeoXConfig.base_model_tp_plan (under gpt_neox.) plus lm_head (untied)."""
    plan = tensor_parallel_plan(tiny_neox(tie_word_embeddings=False), 2)
    assert sorted(plan) == ['gpt_neox.layers.*.attention.dense', 'gpt_neox.layers.*.attention.query_key_value',
                            'gpt_neox.layers.*.mlp.dense_4h_to_h', 'gpt_neox.layers.*.mlp.dense_h_to_4h', 'lm_head']
    assert isinstance(plan['gpt_neox.layers.*.attention.query_key_value'], ColwiseParallel)
    assert isinstance(plan['gpt_neox.layers.*.attention.dense'], RowwiseParallel)


def test_tied_head_stays_whole_and_heads_must_divide():
    """A tied lm_head is left out of the plan (splitting it would untie it); Llama's 2 key/value heads
    do not divide over 4 processes."""
    with torch.device('meta'):
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    assert 'lm_head' not in tensor_parallel_plan(llama, 2)
    with pytest.raises(ValueError, match='num_key_value_heads=2'):
        tensor_parallel_plan(llama, 4)
    with pytest.raises(ValueError, match='num_attention_heads=4'):
        tensor_parallel_plan(tiny_neox(), 3)


def test_optimizer_state_layouts_round_trip():
    """Names ['a', 'b'] ↔ positions [0, 1]."""
    by_name = {'state': {'b': {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': ['a', 'b']}]}
    by_index = optimizer_state_by_index(by_name, ['a', 'b'])
    assert by_index == {'state': {1: {'step': 1}}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}
    assert optimizer_state_by_name(by_index, ['a', 'b']) == by_name
