"""The optimizer: fused kernels where PyTorch has them, checkpoints that load into either kind, weight decay and
the learning-rate schedule."""
import pytest
import torch
import torch.nn as nn

from checkpoints import with_own_implementation
from optimization import fused_optimizer_applies


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


# ----- lr_scheduler and weight_decay -----------------------------------------------------------------

def test_lr_schedules_worked_by_hand():
    """warmup_steps = 2, total_steps = 6. The warmup (all schedules) is the original's (t + 1)/3 = 1/3, 2/3; then
    constant 1; cosine ½(1 + cos(π·p)) with p = (t − 2)/4: t = 2 → 1, t = 3 → 0.853553, t = 4 → 0.5, t = 6 → 0;
    linear 1 − p: 1, 0.75, 0.5, 0.25, 0; past the end the decays stay at 0."""
    from optimization import LRSchedule
    steps = range(8)
    assert [LRSchedule('constant', 2)(t) for t in steps] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])
    assert [LRSchedule('cosine', 2, 6)(t) for t in steps] == pytest.approx(
        [1 / 3, 2 / 3, 1, 0.8535534, 0.5, 0.1464466, 0, 0], abs=1e-7)
    assert [LRSchedule('linear', 2, 6)(t) for t in steps] == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25, 0, 0])
    # the original's lambda, for any warmup
    assert all(LRSchedule('constant', 150)(t) == min(1.0, (t + 1) / 151) for t in range(400))
    with pytest.raises(ValueError, match="lr_scheduler='cosine'"):
        LRSchedule('cosine', 2)


@pytest.mark.parametrize('optimizer, weight_decay, expected', [
    ('AdamW', None, 0.01), ('AdamW', 0, 0.0), ('AdamW', 0.1, 0.1), ('RMSprop', None, 0.0), ('RMSprop', 0.05, 0.05)])
def test_weight_decay_reaches_the_optimizer(tmp_path, optimizer, weight_decay, expected):
    """null keeps the optimizer's own default (AdamW 0.01, RMSprop 0); a number is passed on."""
    from helpers import FAST, start_run
    wd = 'null' if weight_decay is None else weight_decay
    trainer = start_run([*FAST, 'loss=sft', 'n_examples=8', f'optimizer={optimizer}', f'weight_decay={wd}'], tmp_path)
    assert trainer.optimizer.param_groups[0]['weight_decay'] == pytest.approx(expected)


@pytest.mark.slow
def test_decay_schedule_spans_the_run_and_its_checkpoint_carries_it(tmp_path):
    """synthetic.n_train = 64 pairs, batch 8: n_epochs = 2 is 16 steps, n_examples = 44 stops after ⌈44/8⌉ = 6.
    The cosine schedule over those 6 steps is saved in scheduler.pt and restored on resume."""
    from helpers import FAST, start_run
    epochs = start_run([*FAST, 'loss=sft', 'n_epochs=2', 'lr_scheduler=cosine'], tmp_path / 'epochs')
    assert epochs.total_steps() == 16
    run = start_run([*FAST, 'loss=sft', 'n_examples=44', 'lr_scheduler=cosine', 'warmup_steps=2'], tmp_path / 'run')
    assert vars(run.scheduler.lr_lambdas[0]) == {'name': 'cosine', 'warmup_steps': 2, 'total_steps': 6}
    for _ in range(3):
        run.train_step(next(iter(run.train_batches())))  # the stream continues from run.example_counter
    assert run.scheduler.get_last_lr()[0] == pytest.approx(run.config.lr * 0.8535534)  # step 3 of the schedule
    run.save()
    saved = torch.load(run.run_dir / 'LATEST' / 'scheduler.pt', weights_only=True)['state']
    assert saved['lr_lambdas'] == [{'name': 'cosine', 'warmup_steps': 2, 'total_steps': 6}] and saved['last_epoch'] == 3
    resumed = start_run([*FAST, 'loss=sft', 'n_examples=44', 'lr_scheduler=cosine', 'warmup_steps=2',
                         f'resume_from={run.run_dir}'], tmp_path / 'run')
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(run.scheduler.get_last_lr()[0])


@pytest.mark.slow
def test_a_resume_may_not_change_the_length_of_a_decaying_schedule(tmp_path):
    """With lr_scheduler=constant a resumed run may train longer (n_examples is a resumable change); with a decay
    the run's length sets the schedule, so the same change is refused before anything is written."""
    from helpers import FAST, start_run
    run = start_run([*FAST, 'loss=sft', 'n_examples=16', 'lr_scheduler=linear'], tmp_path)
    run.save()
    with pytest.raises(ValueError, match="n_examples: was 16, now 32"):
        start_run([*FAST, 'loss=sft', 'n_examples=32', 'lr_scheduler=linear', f'resume_from={run.run_dir}'], tmp_path)
    constant = start_run([*FAST, 'loss=sft', 'n_examples=16', 'exp_name=constant'], tmp_path)
    constant.save()
    start_run([*FAST, 'loss=sft', 'n_examples=32', 'exp_name=constant', f'resume_from={constant.run_dir}'], tmp_path)


@pytest.mark.parametrize('overrides, message', [
    (['lr_scheduler=step'], "lr_scheduler='step' is unknown; choose one of constant, cosine, linear"),
    (['weight_decay=-0.1'], "weight_decay=-0.1 must be a number ≥ 0, or null (the optimizer's default)"),
    (['optimizer=LBFGS', 'weight_decay=0.1'], 'weight_decay=0.1: optimizer=LBFGS has no weight decay; set '
                                              'weight_decay=null'),
])
def test_bad_schedule_settings_are_named(tmp_path, overrides, message):
    from helpers import FAST, compose_config
    from train import validate_config
    assert message in validate_config(compose_config([*FAST, *overrides], tmp_path))


def test_a_run_that_ends_inside_its_warmup_says_so(tmp_path, capsys):
    """32 examples in batches of 8 = 4 steps against 150 warmup steps at lr 3e-3 (the tiny preset): the lr ends at
    3e-3·4/151 = 7.9e-05, and the run says so before it starts; with warmup_steps=0 nothing is said."""
    from helpers import FAST, start_run
    start_run([*FAST, 'n_examples=32', 'warmup_steps=150'], tmp_path / 'long')
    assert ("WARNING: warmup_steps=150 ≥ this run's 4 optimizer steps: the learning rate never reaches lr=0.003 "
            "(it ends at 7.9e-05); lower warmup_steps, e.g. warmup_steps=0") in capsys.readouterr().out
    start_run([*FAST, 'n_examples=32'], tmp_path / 'none')
    assert 'warmup_steps' not in capsys.readouterr().out
