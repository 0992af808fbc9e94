"""The lean label log-probabilities equal the naive full-logits computation, values and gradients.

`label_logps_from_hidden(h, W, b, labels)` must equal `_get_batch_logps(F.linear(h, W, b), labels)`;
`logps.forward_logps` with logps_chunk_size set must equal it with logps_chunk_size=null, for the
model architectures the presets use (GPT-NeoX, GPT-2, Llama).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from logps import _get_batch_logps, forward_logps, label_logps_from_hidden
from models import disable_dropout


def random_case(seed, batch=5, seq=13, hidden=16, vocab=97, bias=True):
    """Hidden states, head and labels with random −100 masks, one row all −100 and one fully labelled."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.4] = -100
    labels[1] = -100
    labels[3] = torch.randint(0, vocab, (seq,), generator=g)
    return h, w, b, labels


def grads(out, inputs, weights):
    return torch.autograd.grad((out * weights).sum(), [x for x in inputs if x is not None])


@pytest.mark.parametrize('average', [False, True])
@pytest.mark.parametrize('chunk_size', [1, 4, 7, 1000])
@pytest.mark.parametrize('bias', [True, False])
def test_lean_equals_naive_with_gradients(average, chunk_size, bias):
    """Sums and means within 1e-5 (relative: sums reach about 13 tokens × ln 97 ≈ 60), gradients w.r.t.
    the hidden states, the head's weight and bias within 1e-5, for any chunk size; the all −100 row is 0."""
    h, w, b, labels = random_case(seed=chunk_size, bias=bias)
    weights = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(1))
    lean = label_logps_from_hidden(h, w, b, labels, chunk_size=chunk_size, average_log_prob=average)
    naive = _get_batch_logps(F.linear(h, w, b), labels, average_log_prob=average)
    assert lean.dtype == torch.float32 and lean.shape == (5,)
    torch.testing.assert_close(lean, naive, rtol=1e-5, atol=1e-5)
    assert lean[1].item() == 0.0
    for lean_grad, naive_grad in zip(grads(lean, (h, w, b), weights), grads(naive, (h, w, b), weights)):
        torch.testing.assert_close(lean_grad, naive_grad, rtol=1e-5, atol=1e-5)


def test_lean_worked_value_uniform_head():
    """A zero head gives uniform logits: every labelled token has log p = −ln V. With V = 10 and the
    labels [−100, 3, 4, −100, 5] (3 labelled targets after the shift), the sum is −3 ln 10 = −6.907755
    and the mean −2.302585."""
    h = torch.randn(1, 5, 4)
    w = torch.zeros(10, 4)
    labels = torch.tensor([[-100, 3, 4, -100, 5]])
    assert label_logps_from_hidden(h, w, None, labels).item() == pytest.approx(-3 * math.log(10), abs=1e-5)
    assert label_logps_from_hidden(h, w, None, labels, average_log_prob=True).item() == pytest.approx(-2.302585,
                                                                                                      abs=1e-6)


def test_lean_in_bfloat16_matches_naive_in_bfloat16():
    """With a bfloat16 head both compute the logits in bfloat16 and the log-softmax in float32: equal to
    float32 rounding; the gradients keep the inputs' dtype."""
    h, w, b, labels = random_case(seed=3)
    h, w, b = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    lean = label_logps_from_hidden(h, w, b, labels, chunk_size=4)
    naive = _get_batch_logps(F.linear(h, w, b), labels)
    torch.testing.assert_close(lean, naive, rtol=1e-5, atol=1e-4)
    assert [g.dtype for g in grads(lean, (h, w, b), torch.ones(5))] == [torch.bfloat16] * 3


def tiny_model(kind):
    import transformers
    sizes = dict(vocab_size=61, num_hidden_layers=2, num_attention_heads=2)
    config = {'neox': transformers.GPTNeoXConfig(hidden_size=16, intermediate_size=32, **sizes),
              'gpt2': transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=61),
              'llama': transformers.LlamaConfig(hidden_size=16, intermediate_size=32, **sizes)}[kind]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    disable_dropout(model)  # as build_model does (GPT-2's default dropout is 0.1)
    return model


@pytest.mark.parametrize('kind', ['neox', 'gpt2', 'llama'])
def test_forward_logps_lean_equals_full_logits(tmp_path, kind):
    """Through the model's own forward (right padding, prompt labels −100): the lean path's log-probabilities
    and every parameter's gradient equal those of the full-logits path within 1e-5."""
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 61, (4, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 8:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    labels[2] = -100
    results = []
    for chunk_size in (None, 3):
        model.zero_grad()
        logps = forward_logps(model, input_ids, attention_mask, labels, chunk_size)
        (logps * torch.tensor([1.0, -0.5, 2.0, 0.25])).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (naive, naive_grads), (lean, lean_grads) = results
    torch.testing.assert_close(lean, naive, rtol=1e-5, atol=1e-5)
    assert lean[2].item() == 0.0
    assert lean_grads.keys() == naive_grads.keys()
    for name in naive_grads:
        torch.testing.assert_close(lean_grads[name], naive_grads[name], rtol=1e-5, atol=1e-5, msg=name)
