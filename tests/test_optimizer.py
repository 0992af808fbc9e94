"""The optimizer: fused kernels where PyTorch has them, and checkpoints that load into either kind."""
import pytest
import torch
import torch.nn as nn

from checkpoints import with_own_implementation
from trainers import fused_optimizer_applies


def params():
    return [nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize('name, fused', [('AdamW', True), ('Adam', True), ('SGD', True), ('Adagrad', True),
                                         ('RMSprop', False)])
def test_fused_where_pytorch_has_a_fused_kernel(name, fused):
    assert fused_optimizer_applies(getattr(torch.optim, name), params()) is fused


def test_fused_and_multi_tensor_adamw_take_the_same_step():
    """One AdamW step with gradient 1 moves every weight by lr (Adam's first step is lr·sign(g)),
    decoupled weight decay first: 1 − 0.1·0.01·1 − 0.1 = 0.899, with either kernel."""
    results = []
    for fused in (True, False):
        p = params()
        opt = torch.optim.AdamW(p, lr=0.1, weight_decay=0.01, fused=fused)
        for q in p:
            q.grad = torch.ones_like(q)
        opt.step()
        results.append(torch.cat([q.detach().flatten() for q in p]))
    torch.testing.assert_close(results[0], torch.full((8,), 0.899), rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-7)


def test_a_fused_checkpoint_loads_into_a_multi_tensor_optimizer_and_back():
    fused_params, plain_params = params(), params()
    fused = torch.optim.AdamW(fused_params, lr=0.1, fused=True)
    for q in fused_params:
        q.grad = torch.ones_like(q)
    fused.step()
    plain = torch.optim.AdamW(plain_params, lr=0.1, foreach=True)
    plain.load_state_dict(with_own_implementation(plain, fused.state_dict()))
    assert plain.param_groups[0]['fused'] is None and plain.param_groups[0]['foreach'] is True
    torch.testing.assert_close(plain.state_dict()['state'][0]['exp_avg'], torch.full((4,), 0.1))
    fused.load_state_dict(with_own_implementation(fused, plain.state_dict()))
    assert fused.param_groups[0]['fused'] is True
