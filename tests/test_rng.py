"""Sampling during training and evaluation never shifts the training stream, on the CPU and on CUDA
(generation.seeded_random_state), and a checkpoint keeps the CUDA random state beside the CPU one
(checkpoints.cuda_rng_devices). The CPU path is tested exactly; the CUDA path where a GPU is present (it skips on a
CPU-only machine, where the tests check that nothing starts CUDA)."""
import pytest
import torch

from checkpoints import cuda_rng_devices, load_training_state, restore_cuda_rng_states
from generation import draw_samples, random_state_devices, seeded_random_state
from helpers import FAST, start_run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def random_sampler(batch):
    """A stand-in for generate_texts that draws from the global RNG like sampling does: one number per prompt."""
    return [f'{torch.rand(()).item():.6f}' for _ in batch['prompt']]


def test_draw_samples_depends_on_its_seed_only_and_leaves_the_caller_stream_as_it_was():
    """Two batches of 2 prompts, two samplers: the texts are the first 8 numbers of a generator seeded with 7, in
    batch order, sampler after sampler; the caller's next number is the one it would have drawn without the call."""
    batches = [{'prompt': ['a', 'b']}, {'prompt': ['c', 'd']}]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    prompts, samples = draw_samples(batches, {'policy': random_sampler, 'reference': random_sampler}, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    numbers = [f'{x:.6f}' for x in torch.rand(8, generator=torch.Generator().manual_seed(7)).tolist()]
    assert prompts == ['a', 'b', 'c', 'd']
    assert samples == {'policy': numbers[0:2] + numbers[4:6], 'reference': numbers[2:4] + numbers[6:8]}


def test_nothing_starts_cuda_on_a_machine_that_does_not_use_it():
    """Before CUDA is in use there is no CUDA state to fork or keep: no device is listed, and seeding does not start
    CUDA (torch.manual_seed would queue a reseed of every device, applied unforked when CUDA starts)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip('CUDA is already in use in this process')
    assert random_state_devices() == [] and cuda_rng_devices(1) == [] and cuda_rng_devices(4) == []
    with seeded_random_state(3):
        torch.rand(2)
    assert not (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_a_checkpoint_restores_the_cpu_stream_and_accepts_one_without_cuda_states(tmp_path):
    """trainer_state.pt holds the CPU state and (here, on a CPU run) an empty list of CUDA states; restoring it gives the
    same next random numbers, also from a checkpoint written before CUDA states were kept (no 'cuda_rng' key)."""
    trainer = start_run([*FAST, 'loss=sft'], tmp_path)
    trainer.example_counter = 8
    torch.manual_seed(5)
    trainer.save()
    state = load_training_state(trainer.run_dir / 'LATEST').trainer_state
    assert state['cuda_rng'] == cuda_rng_states_expected()
    expected = torch.rand(4)
    trainer.restore(trainer.run_dir / 'LATEST')
    assert torch.equal(torch.rand(4), expected)
    del state['cuda_rng']
    torch.save(state, trainer.run_dir / 'LATEST' / 'trainer_state.pt')
    trainer.restore(trainer.run_dir / 'LATEST')
    assert torch.equal(torch.rand(4), expected)


def cuda_rng_states_expected():
    return [] if not (torch.cuda.is_available() and torch.cuda.is_initialized()) else [
        torch.cuda.get_rng_state(d) for d in cuda_rng_devices(1)]


def test_cuda_states_saved_for_other_devices_are_not_applied(capsys):
    """A checkpoint with the CUDA states of 2 devices restored where the run uses 1: nothing is set, and a warning says
    the CUDA stream continues from the seed (no device is touched, so this runs on a CPU too)."""
    restore_cuda_rng_states([torch.zeros(16, dtype=torch.uint8)] * 2, [0])
    assert 'the checkpoint holds the CUDA random state of 2 devices, this run uses 1' in capsys.readouterr().out


@needs_cuda
def test_seeded_sampling_forks_and_seeds_the_cuda_stream_too():
    """On a GPU: inside, CUDA random numbers are those of a CUDA generator seeded with `seed`; after, the caller's CUDA
    stream goes on as if nothing had been drawn (before the fix only the CPU state was forked, and torch.manual_seed
    reset the CUDA stream)."""
    torch.cuda.init()
    torch.cuda.manual_seed_all(11)
    expected_next = torch.rand(5, device='cuda')
    torch.cuda.manual_seed_all(11)
    with seeded_random_state(7):
        inside = torch.rand(5, device='cuda')
    assert torch.equal(torch.rand(5, device='cuda'), expected_next)
    assert torch.equal(inside, torch.rand(5, device='cuda', generator=torch.Generator('cuda').manual_seed(7)))
    assert random_state_devices() == list(range(torch.cuda.device_count()))


@needs_cuda
def test_the_cuda_state_survives_a_checkpoint(tmp_path):
    """On a GPU: the CUDA state saved with a checkpoint comes back on restore (the next CUDA random numbers agree)."""
    torch.cuda.init()
    trainer = start_run([*FAST, 'loss=sft'], tmp_path)
    trainer.example_counter = 8
    torch.cuda.manual_seed_all(5)
    trainer.save()
    expected = torch.rand(4, device='cuda')
    trainer.restore(trainer.run_dir / 'LATEST')
    assert torch.equal(torch.rand(4, device='cuda'), expected)
