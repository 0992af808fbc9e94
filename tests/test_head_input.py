"""logps.forward_logps takes what the model feeds its head (the HeadInput hook), on any transformers 5.x and through
wrappers, and computes the head on the head's own device (BasicTrainer split over GPUs with device_map='balanced').

The equality of the lean and full-logits paths for GPT-NeoX, GPT-2 and Llama is tests/test_lean_logps.py; on
transformers 5.0 it failed before the hook (IndexError: too many indices, 5.23's 2-D logits_to_keep mask), and
tests/test_lowest_versions.py runs train.py there.
"""
import pytest
import torch

import logps
from logps import forward_logps, head_input, on_head_device
from test_lean_logps import tiny_model


def inputs(vocab=61):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100
    return input_ids, attention_mask, labels


def test_lora_wrapped_model_lean_equals_full_logits():
    """A peft LoRA model (PeftModelForCausalLM around a Llama, adapters on q/v made non-zero): the lean path's
    log-probabilities and the adapters' gradients equal the full-logits path's within 1e-5."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model('llama'), LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    input_ids, attention_mask, labels = inputs()
    results = []
    for chunk_size in (None, 4):
        model.zero_grad()
        values = forward_logps(model, input_ids, attention_mask, labels, chunk_size)
        values.sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (lean, lean_grads) = results
    torch.testing.assert_close(lean, full, rtol=1e-5, atol=1e-5)
    assert len(lean_grads) == 8 and lean_grads.keys() == full_grads.keys()  # A and B of q and v in 2 layers
    for name in full_grads:
        torch.testing.assert_close(lean_grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_hook_is_registered_once_and_idle_outside_forward_logps():
    """After two lean calls the head has one pre-hook, and a plain forward returns the full (3, 9, 61) logits."""
    model = tiny_model('neox')
    input_ids, attention_mask, labels = inputs()
    forward_logps(model, input_ids, attention_mask, labels, 4)
    forward_logps(model, input_ids, attention_mask, labels, 4)
    head = model.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1 and head_input(head) is head_input(head)
    assert model(input_ids, attention_mask=attention_mask).logits.shape == (3, 9, 61)
    assert head_input(head).hidden is None  # nothing kept alive between calls


def test_on_head_device_moves_hidden_states_and_labels_to_the_heads_device():
    """A head on another device than the hidden states (here 'meta', standing for the last GPU of
    device_map='balanced' while the final norm's output is on the first): both go to the head's device."""
    head = torch.nn.Linear(4, 7, bias=False, device='meta')
    hidden, labels = torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long)
    moved_hidden, moved_labels = on_head_device(head, hidden, labels)
    assert moved_hidden.device.type == moved_labels.device.type == 'meta'
    assert moved_hidden.shape == (2, 5, 4) and moved_labels.dtype == torch.long
    same_hidden, _ = on_head_device(torch.nn.Linear(4, 7), hidden, labels)
    assert same_hidden is hidden  # nothing copied when they are already together


def test_forward_logps_computes_the_head_on_its_device_and_returns_to_the_labels(monkeypatch):
    """forward_logps passes the hidden states and labels through on_head_device (with the head's weight's device)
    and returns (batch,) values on the labels' device."""
    calls = []

    def recording(head, hidden, labels):
        calls.append(logps.head_device(head))
        return on_head_device(head, hidden, labels)
    monkeypatch.setattr(logps, 'on_head_device', recording)
    model = tiny_model('gpt2')
    input_ids, attention_mask, labels = inputs()
    values = forward_logps(model, input_ids, attention_mask, labels, 4)
    assert calls == [model.get_output_embeddings().weight.device]
    assert values.shape == (3,) and values.device == labels.device


@pytest.mark.parametrize('kind', ['neox', 'llama', 'gpt2'])
def test_the_head_input_is_the_final_normed_state(kind):
    """What the hook takes equals the base model's last_hidden_state (after the final norm), whichever attribute
    holds the base model (gpt_neox, model, transformer)."""
    model = tiny_model(kind)
    input_ids, attention_mask, _ = inputs()
    base = getattr(model, model.base_model_prefix)
    expected = base(input_ids, attention_mask=attention_mask).last_hidden_state
    hidden = logps.last_hidden_state(model, model.get_output_embeddings(), input_ids, attention_mask)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


def test_an_archive_naming_the_head_otherwise_loads():
    """GPT-NeoX's head is `embed_out` on transformers 5.0 and `lm_head` on 5.23: a state dict with the other name
    loads into the model of either version (load_state_dict_checked), the head's values included."""
    from checkpoints import load_state_dict_checked
    model = tiny_model('neox')
    name = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    other = {'embed_out': 'lm_head', 'lm_head': 'embed_out'}[name]
    state = {(f'{other}.weight' if key == f'{name}.weight' else key): value.clone() + 1
             for key, value in model.state_dict().items()}
    fresh = tiny_model('neox')
    load_state_dict_checked(fresh, state, 'an archive of another transformers version')
    torch.testing.assert_close(fresh.get_output_embeddings().weight, state[f'{other}.weight'], rtol=0, atol=0)
