"""TensorParallelTrainer's head (logps.sharded_head_label_logps, the head called as a module) a chunk of labelled
positions at a time: the same values and gradients as the whole-vocabulary computation, without keeping any
chunk's logits for the backward pass. The tensor-parallel runs themselves are tests/test_distributed.py's tp_*."""
import pytest
import torch
import torch.nn.functional as F

from logps import _get_batch_logps, sharded_head_label_logps
from test_lean_logps import random_case


@pytest.mark.parametrize('chunk_size', [1, 3, 1000])
def test_chunked_module_head_equals_full_logits_with_gradients(chunk_size):
    """Sums of the 5 rows (one all −100) within 1e-5 of _get_batch_logps(head(h)), and the gradients of h, the
    weight and the bias within 1e-5."""
    h, w, b, labels = random_case(seed=chunk_size)
    head = torch.nn.Linear(16, 97)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    chunked = sharded_head_label_logps(head, h, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad(chunked.sum(), [h, head.weight, head.bias])
    full = _get_batch_logps(F.linear(h, w, b), labels)
    full_grads = torch.autograd.grad(full.sum(), [h, w, b])
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_logits_are_kept_for_the_backward_pass():
    """With gradients, autograd saves no tensor with a vocabulary dimension (97) in the forward pass: neither a
    chunk's 4 × 97 logits nor their log-softmax (without the checkpointing of each chunk, log_softmax saves its
    output, and the test fails)."""
    h, w, b, labels = random_case(seed=0)
    head = torch.nn.Linear(16, 97)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        sharded_head_label_logps(head, h, labels, chunk_size=4).sum()
    assert saved and all(97 not in shape for shape in saved), saved
