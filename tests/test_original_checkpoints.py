"""A policy.pt written by the original code loads as model.archive.

The original (junkangwu/beta-DPO, transformers 4.29) saved `{'step_idx', 'state', 'metrics'}` with torch.save, the
state being `policy.state_dict()` of its transformers version. For GPT-NeoX that had persistent buffers today's
model no longer keeps, per layer the causal mask `attention.bias` (bool, 1×1×P×P for P positions),
`attention.masked_bias` (−1e9) and the rotary `attention.rotary_emb.inv_freq`, and it named the output layer
`embed_out` (now `lm_head`). Here such an archive is built from the embedded tiny GPT-NeoX's weights in that layout.
"""
import collections

import pytest
import torch

from checkpoints import load_state_dict_checked
from helpers import FAST, compose_config, start_run
from models import build_model

N_LAYERS = 4  # the embedded tiny GPT-NeoX


def perturbed_tiny_model(tmp_path):
    """The embedded tiny model with its weights moved off their seed-0 initialization (so loading them shows)."""
    model = build_model(compose_config(FAST, tmp_path), 'float32', None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def original_layout(state, positions, rotary_dims):
    """`state` (today's keys) as transformers 4.29's GPTNeoXForCausalLM.state_dict() had it."""
    old = collections.OrderedDict((key.replace('lm_head.', 'embed_out.'), value) for key, value in state.items())
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
    for layer in range(N_LAYERS):
        prefix = f'gpt_neox.layers.{layer}.attention.'
        old[prefix + 'bias'] = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions,
                                                                                                  positions)
        old[prefix + 'masked_bias'] = torch.tensor(-1e9)
        old[prefix + 'rotary_emb.inv_freq'] = inv_freq
    return old


@pytest.fixture
def original_archive(tmp_path):
    """(path of an original-layout policy.pt, the model whose weights it holds)."""
    model = perturbed_tiny_model(tmp_path)
    config = model.config
    state = original_layout(model.state_dict(), config.max_position_embeddings,
                            config.hidden_size // config.num_attention_heads)
    path = tmp_path / 'original' / 'policy.pt'
    path.parent.mkdir()
    torch.save({'step_idx': 4096, 'state': state, 'metrics': {'loss/eval': 1.25}}, path)
    return path, model


@pytest.mark.slow
def test_an_archive_of_the_original_loads_with_the_same_logits(original_archive, tmp_path, capsys):
    """`model.archive=` an original policy.pt (the 52 weights, embed_out.weight among them, plus 12 old buffers):
    the run starts, policy and reference compute exactly the logits of the model the archive was
    written from, and a warning names the 3 buffer kinds of the 4 layers it left out."""
    path, source_model = original_archive
    trainer = start_run([*FAST, 'loss=dpo', 'loss.beta=0.1', f'model.archive={path}'], tmp_path)
    output = capsys.readouterr().out
    assert 'loading pre-trained weights at step 4096' in output
    assert (f'WARNING: model.archive {path}: ignoring 12 entries this model does not have (buffers an older '
            f'transformers version saved): gpt_neox.layers.*.attention.bias (4 entries), '
            f'gpt_neox.layers.*.attention.masked_bias (4 entries), '
            f'gpt_neox.layers.*.attention.rotary_emb.inv_freq (4 entries)') in output
    input_ids = torch.tensor([list(b'\n\nHuman: reverse cab\n\nAssistant: bac')])
    with torch.no_grad():
        expected = source_model(input_ids).logits
        assert torch.equal(trainer.policy(input_ids).logits, expected)
        assert torch.equal(trainer.reference.model(input_ids).logits, expected)
        untrained = build_model(trainer.config, 'float32', None)
        assert not torch.equal(trainer.policy.lm_head.weight, untrained.lm_head.weight)


def test_a_missing_or_misshaped_weight_still_fails(original_archive, tmp_path):
    """Only entries that are no weight of the model at all are forgiven: a missing weight, a weight of the
    wrong shape and a weight of a fifth layer (a bigger model) are refused, naming the keys."""
    path, _ = original_archive
    archive = torch.load(path, weights_only=True)
    model = build_model(compose_config(FAST, tmp_path), 'float32', None)

    missing = {k: v for k, v in archive['state'].items() if k != 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight'}
    with pytest.raises(ValueError, match=r'missing keys: gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.weight'):
        load_state_dict_checked(model, missing, 'old archive')

    misshaped = {**archive['state'], 'embed_out.weight': torch.zeros(300, 128)}
    with pytest.raises(ValueError, match=r'wrong shapes: lm_head\.weight \(300, 128\) vs \(320, 128\)'):
        load_state_dict_checked(model, misshaped, 'old archive')

    bigger = {**archive['state'], 'gpt_neox.layers.4.attention.dense.bias': torch.zeros(128)}
    with pytest.raises(ValueError, match=r'unexpected keys: gpt_neox\.layers\.4\.attention\.dense\.bias'):
        load_state_dict_checked(model, bigger, 'old archive')
