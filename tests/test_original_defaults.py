"""The original's defaults and command-line behaviour (junkangwu/beta-DPO at 1629047): config.yaml's values, the
two commands of its README, the embedded default that still runs with no arguments, model.block_name required
only where it is used, and TF32 on as the original sets it."""
import pytest
import torch
from omegaconf import OmegaConf

from helpers import FAST, compose_config, train_in_process
from train import validate_config

# The β-DPO README's two commands (README.md "The two-stage pipeline" has the same keys), as argument lists.
STAGE_1 = ['model=pythia28', 'datasets=[hh]', 'loss=sft', 'exp_name=anthropic_beta_dpo_pythia28',
           'gradient_accumulation_steps=2', 'batch_size=64', 'eval_batch_size=32', 'trainer=FSDPTrainer',
           'sample_during_eval=false', 'model.fsdp_policy_mp=bfloat16']
STAGE_2_EXTRA = ['loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6']

# What the original's config.yaml, config/model/pythia28.yaml and config/loss/{sft,dpo}.yaml give for those
# commands: every key the original has, with its value.
ORIGINAL_STAGE_1 = {
    'seed': 0, 'exp_name': 'anthropic_beta_dpo_pythia28', 'batch_size': 64, 'eval_batch_size': 32, 'debug': False,
    'fsdp_port': None, 'datasets': ['hh'], 'wandb': {'enabled': True, 'entity': None, 'project': 'beta-DPO'},
    'local_dirs': ['/scr-ssd', '/scr', '.cache'], 'sample_during_eval': False, 'n_eval_model_samples': 16,
    'do_first_eval': True, 'lr': 5e-7, 'gradient_accumulation_steps': 2, 'max_grad_norm': 10.0, 'max_length': 512,
    'max_prompt_length': 256, 'n_epochs': 1, 'n_examples': None, 'n_eval_examples': 256, 'trainer': 'FSDPTrainer',
    'optimizer': 'RMSprop', 'warmup_steps': 150, 'activation_checkpointing': False, 'eval_every': 20_000,
    'minimum_log_interval_secs': 1.0,
    'model': {'name_or_path': 'EleutherAI/pythia-2.8b', 'tokenizer_name_or_path': None, 'archive': None,
              'block_name': 'GPTNeoXLayer', 'policy_dtype': 'float32', 'fsdp_policy_mp': 'bfloat16',
              'reference_dtype': 'float16'},
    'loss': {'name': 'sft'},
}
ORIGINAL_STAGE_2_LOSS = {'name': 'dpo', 'beta': 0.1, 'label_smoothing': 0, 'reference_free': False,
                         'mode_loss': 'beta_DPO', 'mode_weight': 0.2, 'a': 0.6}


def original_keys_of(config, expected):
    """`config`'s values of the keys in `expected` (nested alike), as plain containers."""
    return {key: original_keys_of(config[key], value) if isinstance(value, dict) else
            OmegaConf.to_container(config[key]) if OmegaConf.is_config(config[key]) else config[key]
            for key, value in expected.items()}


def command_config(args, tmp_path):
    """The config of `python train.py ARGS` with the original's local_dirs (the helpers set a temporary one)."""
    config = compose_config(args, tmp_path)
    config.local_dirs = ['/scr-ssd', '/scr', '.cache']
    return config


def test_config_yaml_has_the_original_defaults(tmp_path):
    """batch_size 4, eval_batch_size 16, datasets [hh]; exp_name and (for DPO) loss.beta required (???)."""
    config = compose_config(['model=pythia28', 'loss=dpo'], tmp_path)
    assert (config.batch_size, config.eval_batch_size, list(config.datasets)) == (4, 16, ['hh'])
    assert OmegaConf.is_missing(config, 'exp_name') and OmegaConf.is_missing(config.loss, 'beta')
    assert config.allow_tf32 is True


def test_the_two_readme_commands_give_the_original_config(tmp_path):
    """Stage 1 (SFT) and stage 2 (β-DPO from its archive) resolve every key of the original's config to the
    original's value, and validate."""
    stage_1 = command_config(STAGE_1, tmp_path)
    assert original_keys_of(stage_1, ORIGINAL_STAGE_1) == ORIGINAL_STAGE_1
    assert validate_config(stage_1) == []

    archive = tmp_path / 'policy.pt'
    archive.write_bytes(b'an SFT archive')
    stage_2_args = [arg.replace('loss=sft', 'loss=dpo') for arg in STAGE_1] + \
        ['loss.beta=0.1', f'model.archive={archive}', *STAGE_2_EXTRA]
    stage_2 = command_config(stage_2_args, tmp_path)
    expected = {**ORIGINAL_STAGE_1, 'model': {**ORIGINAL_STAGE_1['model'], 'archive': str(archive)},
                'loss': ORIGINAL_STAGE_2_LOSS}
    assert original_keys_of(stage_2, expected) == expected
    assert validate_config(stage_2) == []


@pytest.mark.parametrize('dropped, message', [
    ('exp_name=', 'missing values for: exp_name (set them on the command line, e.g. exp_name=...)'),
    ('loss.beta=', 'missing values for: loss.beta (set them on the command line, e.g. loss.beta=...)')])
def test_leaving_out_a_required_key_is_refused_as_in_the_original(tmp_path, dropped, message):
    """The original raises on OmegaConf's missing keys before anything runs; so does validate_config."""
    args = [arg.replace('loss=sft', 'loss=dpo') for arg in STAGE_1] + ['loss.beta=0.1', *STAGE_2_EXTRA]
    config = command_config([arg for arg in args if not arg.startswith(dropped)], tmp_path)
    assert validate_config(config) == [message]


def test_no_arguments_is_the_embedded_default(tmp_path):
    """`python train.py`: its preset (config/model/tiny.yaml) names the run and picks the generated task."""
    config = compose_config([], tmp_path)
    assert validate_config(config) == []
    assert (config.exp_name, list(config.datasets), config.model.name_or_path) == ('tiny_sft', ['synthetic'],
                                                                                  'embedded:tiny')
    assert (config.batch_size, config.eval_batch_size) == (32, 64)


@pytest.mark.parametrize('overrides, problem', [
    (['trainer=BasicTrainer'], None),
    (['trainer=BasicTrainer', 'activation_checkpointing=true'], None),  # the model's own checkpointing
    (['trainer=TensorParallelTrainer'], None),
    (['trainer=FSDPTrainer'], 'trainer=FSDPTrainer (it shards the model block by block)'),
    (['trainer=TensorParallelTrainer', 'activation_checkpointing=true'],
     'activation_checkpointing=true with trainer=TensorParallelTrainer (it wraps each block)')])
def test_block_name_is_required_only_by_the_trainers_that_use_it(tmp_path, overrides, problem):
    """model=blank_model has block_name: null, as in the original; only FSDP (always) and tensor parallelism
    with activation checkpointing wrap blocks, so only they ask for it, before anything is loaded."""
    config = compose_config(['model=blank_model', 'model.name_or_path=gpt2', 'exp_name=x', *overrides], tmp_path)
    assert config.model.block_name is None
    expected = [] if problem is None else [
        f'model.block_name is null, but {problem} needs the class name of a transformer block; set e.g. '
        f'model.block_name=GPTNeoXLayer (Pythia), LlamaDecoderLayer or GPT2Block']
    assert validate_config(config) == expected


@pytest.mark.parametrize('allow_tf32', [False, True])
@pytest.mark.slow
def test_allow_tf32_is_applied_when_the_run_starts(tmp_path, allow_tf32):
    """allow_tf32 sets torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 in the training process
    (the original sets the first on import; the flags can be set, without effect, on a machine without a GPU)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not allow_tf32
    try:
        train_in_process([*FAST, 'loss=sft', 'n_examples=8', 'do_first_eval=false', f'allow_tf32={allow_tf32}'],
                         tmp_path)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allow_tf32, allow_tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
