"""activation_checkpointing=true under BasicTrainer: the same losses and gradients, each block run twice."""
import pytest
import torch

from helpers import FAST, compose_config
from train import build_run_models, prepare_run
from trainers import BasicTrainer


class GradientRecorder(BasicTrainer):
    """Keeps a copy of the policy's gradients at every step, before clipping."""

    def clip_gradient(self):
        self.gradients.append({name: p.grad.clone() for name, p in self.policy.named_parameters()})
        return super().clip_gradient()


def two_dpo_steps(tmp_path, checkpointing):
    """(losses, gradients, input_layernorm calls per block) of 2 SGD steps of DPO, batch 8, on the tiny GPT-NeoX."""
    config = compose_config([*FAST, 'loss=dpo', 'loss.beta=0.1', 'n_examples=16', 'optimizer=SGD', 'lr=0.1',
                             f'activation_checkpointing={str(checkpointing).lower()}'], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    trainer = GradientRecorder(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.gradients = []
    calls = [0] * len(policy.gpt_neox.layers)
    for i, layer in enumerate(policy.gpt_neox.layers):
        # the block's first operation: it runs again whenever the block's forward is recomputed
        layer.input_layernorm.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    trainer.setup_optimization()
    trainer.reference.model.eval()
    losses = [trainer.train_step(batch)['loss/train'] for batch in trainer.train_batches()]
    return losses, trainer.gradients, calls


@pytest.mark.slow
def test_checkpointed_steps_equal_plain_steps_and_run_each_block_twice(tmp_path):
    """2 SGD steps (lr 0.1) of DPO from policy = reference: the first loss is ln 2 = 0.693147 both ways,
    and every loss and every parameter's gradient is the same with and without checkpointing (the
    recomputation repeats the same float32 operations on the same inputs). Each of the 4 blocks runs once
    per step without checkpointing (2 calls in 2 steps) and twice with it (4: forward, then the recompute
    in the backward pass)."""
    plain_losses, plain_gradients, plain_calls = two_dpo_steps(tmp_path, checkpointing=False)
    losses, gradients, calls = two_dpo_steps(tmp_path, checkpointing=True)
    assert plain_calls == [2, 2, 2, 2]
    assert calls == [4, 4, 4, 4]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.693147, abs=1e-5)
    assert losses == pytest.approx(plain_losses, rel=1e-6)
    assert plain_losses[1] != pytest.approx(plain_losses[0], abs=1e-5)  # the first step moved the policy
    assert len(gradients) == len(plain_gradients) == 2
    for step, plain in zip(gradients, plain_gradients):
        assert step.keys() == plain.keys()
        for name, gradient in plain.items():
            torch.testing.assert_close(step[name], gradient, rtol=1e-6, atol=1e-9, msg=name)
    assert max(g.abs().max().item() for g in plain_gradients[0].values()) > 1e-3
