"""Every config group option composes with Hydra, and validation reports every problem at once."""
import pytest
from omegaconf import OmegaConf

from helpers import ROOT, compose_config
from train import validate_config

MODELS = sorted(p.stem for p in (ROOT / 'config' / 'model').glob('*.yaml'))
LOSSES = sorted(p.stem for p in (ROOT / 'config' / 'loss').glob('*.yaml'))


def test_the_original_presets_are_all_there():
    assert {'pythia28', 'pythia69', 'gpt2-large', 'gpt2-xl', 'gptj', 'llama7b', 'blank_model', 'tiny'} <= set(MODELS)
    assert LOSSES == ['dpo', 'ipo', 'kto', 'sft', 'simpo']


@pytest.mark.parametrize('model', MODELS)
@pytest.mark.parametrize('loss', LOSSES)
def test_every_model_and_loss_composes_and_validates(tmp_path, model, loss):
    """As in the original, a run names itself (exp_name), DPO and IPO need loss.beta (SimPO has its paper's), a blank model
    its name_or_path; the embedded default (tiny) sets its own exp_name. With those given, every pair validates."""
    config = compose_config([f'model={model}', f'loss={loss}'], tmp_path)
    missing = [key for key, required in (('exp_name', model != 'tiny'), ('loss.beta', loss in ('dpo', 'ipo', 'kto')),
                                         ('model.name_or_path', model.startswith('blank_model'))) if required]
    expected = [f'missing values for: {", ".join(missing)} (set them on the command line, e.g. {missing[0]}=...)'] \
        if missing else []
    assert validate_config(config) == expected
    given = {'exp_name': 'x', 'loss.beta': '0.1', 'model.name_or_path': 'gpt2'}
    config = compose_config([f'model={model}', f'loss={loss}', *(f'{key}={given[key]}' for key in missing)], tmp_path)
    assert validate_config(config) == []
    assert config.model.name_or_path and (config.model.block_name or model.startswith('blank_model'))


def test_original_config_keys_are_kept(tmp_path):
    config = compose_config([], tmp_path)
    for key in ('seed', 'exp_name', 'batch_size', 'eval_batch_size', 'debug', 'fsdp_port', 'datasets', 'wandb',
                'local_dirs', 'sample_during_eval', 'n_eval_model_samples', 'do_first_eval', 'local_run_dir', 'lr',
                'gradient_accumulation_steps', 'max_grad_norm', 'max_length', 'max_prompt_length', 'n_epochs',
                'n_examples', 'n_eval_examples', 'trainer', 'optimizer', 'warmup_steps', 'activation_checkpointing',
                'eval_every', 'minimum_log_interval_secs'):
        assert key in config, key
    assert set(config.wandb) == {'enabled', 'entity', 'project'}
    dpo = compose_config(['loss=dpo'], tmp_path).loss
    assert set(dpo) >= {'name', 'beta', 'label_smoothing', 'reference_free', 'mode_loss', 'mode_weight', 'a'}
    assert OmegaConf.is_missing(dpo, 'beta')  # required, as in the original


def test_every_yaml_key_has_a_comment_above_it():
    """STYLE.md: every key documented where it is defined."""
    for path in (ROOT / 'config').rglob('*.yaml'):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(('#', '-')) or ':' not in stripped or stripped == 'defaults:':
                continue
            above = lines[i - 1].strip() if i else ''
            assert above.startswith('#') or above.endswith(':'), f'{path.name}: key {stripped!r} has no comment above it'


def test_all_problems_are_reported_at_once(tmp_path):
    config = compose_config(['loss=dpo', 'loss.mode_loss=beta_dpo', 'loss.mode_weight=1.0', 'loss.beta=-1',
                             'trainer=DDPTrainer', 'optimizer=Adamm', 'batch_size=6',
                             'gradient_accumulation_steps=4', 'model.archive=/nonexistent/policy.pt'], tmp_path)
    problems = validate_config(config)
    joined = '\n'.join(problems)
    assert len(problems) == 7, joined
    for expected in ("loss.mode_loss='beta_dpo' is unknown", 'loss.mode_weight=1.0', 'loss.beta=-1',
                     "trainer='DDPTrainer' is unknown", "optimizer='Adamm'", 'batch_size=6 must be divisible',
                     'model.archive=/nonexistent/policy.pt does not exist'):
        assert expected in joined, expected


def test_compile_policy_is_refused_with_tensor_parallelism(tmp_path):
    """torch 2.13 cannot trace the tensor-parallel model's backward pass; the pair is refused up front."""
    config = compose_config(['trainer=TensorParallelTrainer', 'compile_policy=true'], tmp_path)
    assert validate_config(config) == [
        "compile_policy=true does not work with trainer=TensorParallelTrainer (torch 2.13 fails to trace the split "
        "model's backward pass); use compile_policy=false or trainer=FSDPTrainer"]
    assert validate_config(compose_config(['trainer=FSDPTrainer', 'compile_policy=true'], tmp_path)) == []


def test_command_line_knows_the_keys_of_the_chosen_loss():
    """The command-line check reads the loss group the command picks: SimPO's γ and KTO's λ_D, λ_U are keys of
    loss=simpo and loss=kto (it once read no group and refused them as DPO's unknown keys), and stay unknown under
    loss=dpo."""
    from train import command_line_problems
    assert command_line_problems(['loss=simpo', 'loss.beta=2.5', 'loss.gamma=1.375']) == []
    assert command_line_problems(['loss=kto', 'loss.beta=0.1', 'loss.desirable_weight=1.33']) == []
    assert command_line_problems(['loss=dpo', 'loss.beta=0.1', 'loss.gamma=1.0']) == [
        "loss.gamma is not a key of train.py's config; did you mean loss.a?"]
