"""The config's schema: every key's type and range in one table, the rules between keys in one checker.

    from config_schema import validate_config, TRAIN_SCHEMA
    problems = validate_config(config)      # train.py: every problem at once, each naming the key and what to do
    problems = table_problems(config, EVALUATE_SCHEMA)    # evaluate.py: the same mechanism, its own table

A table maps each key of the YAML (config/config.yaml, config/model/*.yaml, config/loss/*.yaml) to a `Rule`: a test
of the value and what the value must be, said to the user as `key=value must be ...`. The loss group's keys come from
the loss registry (losses.py): the DPO family's shared keys here, and each objective's own hyperparameters (SimPO's
gamma) from its registration, so a new objective needs no row here. A key the tables do not know, also one added
with `+` on the command line, is refused with the closest known key suggested. The rules between keys (the batch
divisible by the processes, a loss type of its loss, β-DPO's switches set without β-DPO, paths that must exist) are
`cross_field_problems`; all of it runs before anything is loaded, so a mistake costs seconds and leaves no files.
"""
import difflib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import losses
from checkpoints import flat_items
from distributed import Parallelism, decide_parallelism, holds_rank0_files, precision_problems
from models import model_directory_problems
from optimization import LR_SCHEDULES


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: `ok(value)`, said to the user as 'KEY=VALUE {requirement}'."""
    ok: Callable[[Any], bool]
    requirement: str


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_dtype(name) -> bool:
    return isinstance(getattr(torch, str(name), None), torch.dtype)


def number(low: Optional[float] = None, high: Optional[float] = None, closed_high: bool = False,
           what: str = '') -> Rule:
    """A finite number in [low, high) (or [low, high] with closed_high); None leaves that side open."""
    def ok(value):
        return (is_number(value) and math.isfinite(value) and (low is None or value >= low)
                and (high is None or value < high or (closed_high and value == high)))
    bounds = ('' if low is None and high is None else
              f' ≥ {low:g}' if high is None else f' in [{low:g}, {high:g}{"]" if closed_high else ")"}' if low is not None
              else f' below {high:g}')
    return Rule(ok, f'{what}must be a number{bounds}')


def positive(what: str = '') -> Rule:
    return Rule(lambda v: is_number(v) and v > 0 and math.isfinite(v), f'{what}must be a positive number')


def positive_int(what: str = '', or_null: bool = False, example: str = '') -> Rule:
    return Rule(lambda v: (or_null and v is None) or (is_int(v) and v > 0),
                f'{what}must be a positive integer{example}' + (' or null' if or_null else ''))


def one_of(*choices, what: str = '') -> Rule:
    return Rule(lambda v: v in choices, f'{what}is unknown; choose one of {", ".join(map(str, choices))}')


def optional(rule: Rule, meaning: str) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f'{rule.requirement}, or null ({meaning})')


BOOLEAN = Rule(lambda v: isinstance(v, bool), 'must be true or false')
TEXT = Rule(lambda v: isinstance(v, str) and v != '', 'must be a non-empty string')
OPTIONAL_TEXT = Rule(lambda v: v is None or (isinstance(v, str) and v != ''), 'must be a non-empty string or null')
INTEGER = Rule(is_int, 'must be an integer')
DTYPE = Rule(is_dtype, 'is not a torch dtype (float32, bfloat16, float16)')
ANY = Rule(lambda v: True, '')


def non_empty_list(example: str) -> Rule:
    return Rule(lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
                f'must be a non-empty list, e.g. {example}')


def optimizer_class(name) -> Optional[type]:
    value = getattr(torch.optim, str(name), None)
    return value if isinstance(value, type) else None


def beta_range_ok(value) -> bool:
    low, high = value if isinstance(value, (list, ListConfig)) and len(value) == 2 else (None, None)
    return is_number(low) and 0 <= low <= 1 and (high is None or (is_number(high) and high >= 1))


# Every key of config/config.yaml and config/model/*.yaml (hydra's own keys aside).
TRAIN_SCHEMA: Dict[str, Rule] = {
    'seed': INTEGER,
    'exp_name': TEXT,
    'batch_size': positive_int(), 'eval_batch_size': positive_int(),
    'debug': BOOLEAN,
    'fsdp_port': Rule(lambda v: v is None or (is_int(v) and 0 < v < 65536), 'must be a port number or null'),
    'datasets': non_empty_list('datasets=[hh]'),
    'render_hh_with_chat_template': BOOLEAN,
    'wandb.enabled': BOOLEAN, 'wandb.entity': OPTIONAL_TEXT, 'wandb.project': TEXT,
    'local_dirs': non_empty_list('local_dirs=[.cache]'),
    'sample_during_eval': BOOLEAN,
    'n_eval_model_samples': Rule(lambda v: is_int(v) and v >= 0, 'must be an integer ≥ 0'),
    'do_first_eval': BOOLEAN,
    'local_run_dir': TEXT,
    'lr': positive(),
    'gradient_accumulation_steps': positive_int(),
    'fsdp_gradient_sync': one_of('step', 'microbatch'),
    'max_grad_norm': positive(),
    'max_length': positive_int(), 'max_prompt_length': positive_int(),
    'n_epochs': positive_int(or_null=True), 'n_examples': positive_int(or_null=True),
    'n_eval_examples': positive_int(or_null=True),
    'trainer': ANY,  # distributed.decide_parallelism checks it, with the processes it implies
    'optimizer': Rule(lambda v: optimizer_class(v) is not None,
                      'is not a torch.optim optimizer (e.g. RMSprop, Adam, AdamW)'),
    'warmup_steps': Rule(lambda v: is_int(v) and v >= 0, 'must be an integer ≥ 0'),
    'lr_scheduler': one_of(*LR_SCHEDULES),
    'weight_decay': optional(number(0), "the optimizer's default"),
    'activation_checkpointing': BOOLEAN,
    'logps_chunk_size': positive_int(or_null=True, example=' (e.g. 1024)'),
    'length_bucket_batches': positive_int(or_null=True, example=' (e.g. 50)'),
    'padding_free': BOOLEAN,
    'padding_free_row_tokens': positive_int(or_null=True, example=' (e.g. 1024)'),
    'precompute_ref_log_probs': BOOLEAN,
    'precompute_save_every_secs': number(0, what='(seconds) '),
    'allow_tf32': BOOLEAN,
    'policy_autocast': optional(DTYPE, 'no autocast'),
    'compile_policy': BOOLEAN,
    # mallopt(3): M_MMAP_THRESHOLD is at most HEAP_MAX/2 = 32 MiB on 64-bit systems
    'cpu_malloc_mmap_threshold': optional(Rule(lambda v: is_int(v) and 0 <= v <= 32 * 2 ** 20,
                                               'must be an integer of bytes from 0 to 33554432 (32 MiB)'),
                                          "glibc's dynamic threshold"),
    'eval_every': positive_int(),
    'minimum_log_interval_secs': number(0, what='(seconds) '),
    'n_cpu_processes': positive_int(),
    'collective_timeout_secs': optional(positive('(seconds) '), "PyTorch's default"),
    'trust_remote_code': BOOLEAN,
    'resume_from': OPTIONAL_TEXT,
    'on_nonfinite': one_of('stop', 'skip'),
    'lora.r': Rule(lambda v: is_int(v) and v >= 0,
                   "must be a non-negative integer: the adapters' rank (e.g. lora.r=16), 0 for no LoRA"),
    'lora.alpha': positive('(α; the adapters are scaled by α/r) '),
    'lora.dropout': number(0, 1),
    'lora.target_modules': Rule(lambda v: v is None or (isinstance(v, (list, ListConfig)) and len(v) > 0 and all(
        isinstance(t, str) and t for t in v)), 'must be null (the attention and MLP projections) or a non-empty list '
        'of module names, e.g. lora.target_modules=[q_proj,v_proj]'),
    'synthetic.n_train': positive_int(), 'synthetic.n_test': positive_int(),
    'synthetic.low_gap_fraction': number(0, 1, closed_high=True),
    'synthetic.flip_fraction': number(0, 1, closed_high=True),
    'synthetic.train_pairs': OPTIONAL_TEXT,
    'synthetic.n_gold_eval': Rule(lambda v: is_int(v) and v >= 0, 'must be an integer ≥ 0 (0 turns it off)'),
    'model.name': TEXT, 'model.name_or_path': TEXT, 'model.tokenizer_name_or_path': OPTIONAL_TEXT,
    'model.archive': OPTIONAL_TEXT, 'model.block_name': OPTIONAL_TEXT,
    'model.policy_dtype': DTYPE, 'model.reference_dtype': DTYPE,
    'model.fsdp_policy_mp': optional(DTYPE, 'the policy dtype'),
}

# The keys of config/loss/dpo.yaml, which ipo.yaml and simpo.yaml extend; each objective's own hyperparameters
# (losses.OBJECTIVES[...].hyperparameters) are added by `loss_schema`.
PREFERENCE_SCHEMA: Dict[str, Rule] = {
    'name': ANY,  # checked by cross_field_problems, which names the choices
    'beta': Rule(lambda v: is_number(v) and v > 0, 'must be a positive number (e.g. loss.beta=0.1)'),
    'label_smoothing': number(*losses.LABEL_SMOOTHING, what='(ε of conservative DPO) '),
    'reference_free': BOOLEAN,
    'mode_loss': Rule(lambda v: v in losses.MODE_LOSSES,
                      'is unknown; use mean (the plain loss), beta_DPO or epsilon_DPO'),
    'epsilon': number(0, 1, what='(ε of ε-DPO) '),
    'mode_weight': number(0, 1, what='(ρ, the fraction of pairs the filter drops) '),
    'a': number(what='(α) '),
    'loss_type': ANY,  # checked against its family by cross_field_problems
    'average_log_prob': BOOLEAN,
    'rpo_alpha': number(0, what='(α_RPO, the weight of the chosen NLL) '),
    'momentum': number(0, 1, closed_high=True, what='(γ of the running margin statistics) '),
    'm0': optional(number(what='(M0) '), 'the running mean'),
    'beta_level': one_of(*losses.BETA_LEVELS),
    'filter': one_of(*losses.FILTERS),
    'beta_range': Rule(beta_range_ok, 'must be [r_lo, r_hi] with 0 ≤ r_lo ≤ 1 ≤ r_hi, or r_hi null (β stays in '
                                      '[r_lo·β0, r_hi·β0]), e.g. loss.beta_range=[0.5,2.0]'),
    'beta_dpo_scope': one_of(*losses.BETA_DPO_SCOPES),
}


# The keys of config/evaluate/evaluate.yaml whose values have a rule of their own (model, reference and judge are
# checked by what loads them: generation.model_kind, judges.judge_problems; evaluate.validate_config).
EVALUATE_SCHEMA: Dict[str, Rule] = {
    'datasets': non_empty_list('datasets=[hh]'),
    'temperatures': Rule(lambda v: isinstance(v, list) and len(v) > 0 and all(is_number(t) and t >= 0 for t in v),
                         'must be a non-empty list of numbers >= 0, e.g. [0,0.5,1.0]'),
    'split': Rule(lambda v: v in ('train', 'test'), 'must be train or test'),
    'n_prompts': Rule(lambda v: v is None or (is_int(v) and v > 0), 'must be a positive integer or null (all)'),
    **{key: positive_int() for key in ('n_samples', 'max_new_tokens', 'max_prompt_length', 'batch_size',
                                       'judge_max_new_tokens', 'judge_batch_size', 'api_concurrency')},
    'top_p': Rule(lambda v: is_number(v) and 0 < v <= 1, 'must be in (0, 1]'),
    'render_hh_with_chat_template': Rule(lambda v: v in (None, True, False),
                                         'must be true, false or null (take it from the model)'),
    'dtype': Rule(lambda v: v in ('float32', 'bfloat16', 'float16'), 'must be float32, bfloat16 or float16'),
}


def loss_schema(loss_name: Any) -> Dict[str, Rule]:
    """The keys `loss=loss_name` takes: none but its name for SFT, else the DPO family's and every hyperparameter of
    the registry's objectives of that family."""
    if loss_name == losses.SFT:
        return {'name': ANY}
    schema = dict(PREFERENCE_SCHEMA)
    for name in losses.family_objectives(loss_name):
        for key, bounds in losses.OBJECTIVES[name].hyperparameters.items():
            schema[key] = number(*bounds, what=f'({losses.OBJECTIVES[name].name}\'s {key}) ')
    return schema


def schema_of(config: DictConfig) -> Dict[str, Rule]:
    """The full table of a train.py config: TRAIN_SCHEMA and its loss's keys under `loss.`."""
    loss_name = OmegaConf.select(config, 'loss.name', default=None)
    return {**TRAIN_SCHEMA, **{f'loss.{key}': rule for key, rule in loss_schema(loss_name).items()}}


def config_keys(config: DictConfig) -> List[str]:
    """Every leaf key of `config` as a dotted path, lists as leaves, hydra's own keys left out."""
    container = OmegaConf.to_container(config, resolve=False, throw_on_missing=False)
    return [key for key in flat_items(container) if key.split('.')[0] != 'hydra']


def unknown_key_problems(keys: Iterable[str], schema: Mapping[str, Rule], what: str = 'train.py') -> List[str]:
    """A message per key the schema does not know, with the closest known key ('loss.mode_los' -> 'loss.mode_loss')."""
    problems = []
    for key in keys:
        if key in schema:
            continue
        close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
        hint = f'; did you mean {close[0]}?' if close else '; see config/ for the keys (every one is commented there)'
        problems.append(f'{key} is not a key of {what}\'s config{hint}')
    return problems


def table_problems(config: DictConfig, schema: Mapping[str, Rule], skip: Iterable[str] = ()) -> List[str]:
    """'KEY=VALUE must be ...' for each key of `schema` whose value breaks its rule (missing values and `skip` aside)."""
    problems, skip = [], set(skip)
    for key, rule in schema.items():
        if key in skip:
            continue
        try:
            value = OmegaConf.select(config, key, throw_on_missing=True)
        except Exception:  # ??? (reported as missing) or an interpolation that cannot be resolved yet
            continue
        value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        if not rule.ok(value):
            problems.append(f'{key}={value!r} {rule.requirement}')
    return problems


def missing_problems(config: DictConfig) -> List[str]:
    missing = sorted(OmegaConf.missing_keys(config))
    return [f'missing values for: {", ".join(missing)} (set them on the command line, e.g. {missing[0]}=...)'] \
        if missing else []


def validate_config(config: DictConfig, loss_defaults: Optional[DictConfig] = None) -> List[str]:
    """Every problem with train.py's `config`, as messages naming the key and what to do (empty if it is fine).

    loss_defaults: config/loss/NAME.yaml's own values for this loss (`load_loss_defaults`), against which β-DPO's
    switches count as set; read from the config directory when not given."""
    # Validate a copy whose run directory is not resolved: resolving it creates the directory.
    config = config.copy()
    config.local_run_dir = '(not resolved yet)'
    missing = set(OmegaConf.missing_keys(config))
    schema = schema_of(config)
    problems = missing_problems(config)
    problems += unknown_key_problems(config_keys(config), schema)
    problems += table_problems(config, schema, skip=missing)
    if loss_defaults is None and OmegaConf.select(config, 'loss.name', default=None) in losses.LOSS_NAMES:
        loss_defaults = load_loss_defaults(config.loss.name)
    problems += cross_field_problems(config, loss_defaults, missing)
    return list(dict.fromkeys(problems))


CONFIG_DIR = Path(__file__).resolve().parent / 'config'


def load_loss_defaults(name: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """config/loss/NAME.yaml with the files its defaults list extends (ipo.yaml and simpo.yaml extend dpo.yaml)."""
    own = OmegaConf.load(config_dir / 'loss' / f'{name}.yaml')
    merged = OmegaConf.create()
    for entry in own.pop('defaults', ['_self_']):
        merged = OmegaConf.merge(merged, own if entry == '_self_' else load_loss_defaults(entry, config_dir))
    return merged


def cross_field_problems(config: DictConfig, loss_defaults: Optional[DictConfig], missing=()) -> List[str]:
    """The rules between keys, each check below returning its messages; all run, so every problem shows at once.
    A key that is missing (???) was reported once already and is not reported again here."""
    def get(key):
        try:
            return OmegaConf.select(config, key, throw_on_missing=True)
        except Exception:
            return None

    problems = []
    try:
        parallelism = decide_parallelism(config)
    except ValueError as e:
        problems.append(str(e))
        parallelism = None
    for check in (parallelism_problems, optimization_problems, batch_problems, loss_problems, model_problems,
                  path_problems, secret_problems):
        problems += check(get, parallelism, loss_defaults)
    return [p for p in problems if p.split('=', 1)[0] not in missing]


def parallelism_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    problems = []
    if parallelism is None:
        return []
    if parallelism.tensor_parallel and get('compile_policy'):
        problems.append('compile_policy=true does not work with trainer=TensorParallelTrainer (torch 2.13 fails to trace '
                        'the split model\'s backward pass); use compile_policy=false or trainer=FSDPTrainer')
    if parallelism.tensor_parallel and isinstance(get('lora.r'), int) and get('lora.r') > 0:
        problems.append('lora.r > 0 does not work with trainer=TensorParallelTrainer (its plan splits the plain '
                        'model\'s layers, not LoRA\'s wrapped ones); use trainer=FSDPTrainer or BasicTrainer, or lora.r=0')
    if parallelism.tensor_parallel and get('padding_free'):
        problems.append('padding_free=true is not supported with trainer=TensorParallelTrainer (its packed forward '
                        'pass was never tried with the split attention); use trainer=FSDPTrainer or BasicTrainer, or '
                        'padding_free=false')
    return problems


def optimization_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    weight_decay, optimizer = get('weight_decay'), optimizer_class(get('optimizer'))
    if is_number(weight_decay) and optimizer is not None and 'weight_decay' not in inspect.signature(optimizer).parameters:
        return [f'weight_decay={weight_decay!r}: optimizer={get("optimizer")} has no weight decay; set weight_decay=null']
    return []


def batch_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    problems = []
    n_processes = parallelism.data_parallel_size if parallelism is not None else 1
    batch_size, accumulation = get('batch_size'), get('gradient_accumulation_steps')
    if is_int(batch_size) and is_int(accumulation) and accumulation > 0 and batch_size % (accumulation * n_processes):
        problems.append(f'batch_size={batch_size} must be divisible by gradient_accumulation_steps ({accumulation}) '
                        f'× processes ({n_processes}) = {accumulation * n_processes}')
    eval_batch_size = get('eval_batch_size')
    if is_int(eval_batch_size) and eval_batch_size % n_processes != 0:
        problems.append(f'eval_batch_size={eval_batch_size} must be divisible by the number of processes ({n_processes})')
    if is_int(get('max_length')) and is_int(get('max_prompt_length')) and get('max_prompt_length') >= get('max_length'):
        problems.append(f'max_prompt_length={get("max_prompt_length")} must be smaller than max_length={get("max_length")}')
    if get('n_epochs') is None and get('n_examples') is None:
        problems.append('set n_epochs or n_examples (both are null)')
    return problems


def loss_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    """The loss a known one, its loss_type one of its family's objectives, and no switch set that does nothing:
    β-DPO's without loss.mode_loss=beta_DPO, another objective's hyperparameter."""
    name = get('loss.name')
    if name not in losses.LOSS_NAMES:
        return [f'loss={name!r} is unknown; choose one of {", ".join(f"loss={n}" for n in losses.LOSS_NAMES)}']
    if name == losses.SFT:
        return []
    loss_type, family = get('loss.loss_type'), losses.family_objectives(name)
    if loss_type not in family:
        other = losses.OBJECTIVES.get(loss_type)
        hint = f'use loss={other.family}' if other is not None else f'use {" or ".join(family)}'
        return [f'loss.loss_type={loss_type!r} is not a loss of loss={name}; {hint}']
    problems = []
    if get('loss.mode_loss') == 'mean' and loss_defaults is not None:
        # a value that breaks its own rule is reported by that rule alone
        changed = [key for key in losses.BETA_DPO_SWITCHES if key in loss_defaults
                   and to_plain(get(f'loss.{key}')) != to_plain(loss_defaults[key])
                   and PREFERENCE_SCHEMA[key].ok(to_plain(get(f'loss.{key}')))]
        if changed:
            settings = ', '.join(f'loss.{key}={to_plain(get("loss." + key))}' for key in changed)
            problems.append(f'{settings} '
                            f'{"does" if len(changed) == 1 else "do"} nothing without loss.mode_loss=beta_DPO '
                            f'(β-DPO\'s switches); add loss.mode_loss=beta_DPO, or leave '
                            f'{"it" if len(changed) == 1 else "them"} at the default')
    problems += adaptive_beta_problems(get, parallelism, loss_type, loss_defaults)
    used = set(losses.OBJECTIVES[loss_type].hyperparameters)
    unused = {key for o in losses.OBJECTIVES.values() for key in o.hyperparameters} - used
    for key in sorted(unused):
        if loss_defaults is not None and key in loss_defaults and to_plain(get(f'loss.{key}')) != loss_defaults[key]:
            problems.append(f'loss.{key}={get(f"loss.{key}")} does nothing with loss.loss_type={loss_type}; leave it '
                            f'at {loss_defaults[key]}')
    return problems


def adaptive_beta_problems(get: Callable, parallelism: Optional[Parallelism], loss_type: str,
                           loss_defaults) -> List[str]:
    """ε-DPO's and KTO's limits: what each needs that the pipeline cannot give it."""
    problems = []
    mode = get('loss.mode_loss')
    epsilon_default = loss_defaults.get('epsilon') if loss_defaults is not None else None
    if mode != 'epsilon_DPO' and epsilon_default is not None and get('loss.epsilon') != epsilon_default:
        problems.append(f'loss.epsilon={get("loss.epsilon")} does nothing without loss.mode_loss=epsilon_DPO; add it, '
                        f'or leave loss.epsilon at {epsilon_default}')
    if mode == 'epsilon_DPO':
        if get('loss.name') != 'dpo' or loss_type != 'sigmoid':
            problems.append('loss.mode_loss=epsilon_DPO is ε-DPO on DPO\'s sigmoid loss only (as the authors\' code); '
                            'use loss=dpo loss.loss_type=sigmoid')
        if get('loss.reference_free'):
            problems.append('loss.mode_loss=epsilon_DPO needs the reference model (its perturbed policies mix the '
                            'reference\'s logits); set loss.reference_free=false')
        if get('precompute_ref_log_probs'):
            problems.append('loss.mode_loss=epsilon_DPO cannot use precompute_ref_log_probs=true: it needs the '
                            'reference\'s per-token logits, and the cache holds per-sequence log-probabilities only; '
                            'set precompute_ref_log_probs=false')
        if not get('logps_chunk_size'):
            problems.append('loss.mode_loss=epsilon_DPO computes its perturbed log-probabilities from the hidden states '
                            'a chunk at a time; set logps_chunk_size (e.g. 2048)')
        if get('padding_free'):
            problems.append('loss.mode_loss=epsilon_DPO reads the hidden states of padded rows; set padding_free=false')
        if parallelism is not None and parallelism.tensor_parallel:
            problems.append('loss.mode_loss=epsilon_DPO does not work with trainer=TensorParallelTrainer (its head '
                            'stays sharded); use trainer=FSDPTrainer or BasicTrainer')
    if loss_type in losses.OBJECTIVES and losses.OBJECTIVES[loss_type].reference_point:
        if get('loss.reference_free'):
            problems.append('loss=kto needs the reference model (its log-ratios and z0 read it); set '
                            'loss.reference_free=false')
        if get('precompute_ref_log_probs'):
            problems.append('loss=kto cannot use precompute_ref_log_probs=true: its z0 needs the reference\'s '
                            'log-probabilities of mismatched pairs, which the cache does not hold; set '
                            'precompute_ref_log_probs=false')
        n_processes = parallelism.data_parallel_size if parallelism is not None else 1
        batch_size, accumulation = get('batch_size'), get('gradient_accumulation_steps')
        if is_int(batch_size) and is_int(accumulation) and accumulation > 0 and \
                batch_size // (accumulation * n_processes) < 2:
            problems.append(f'loss=kto needs at least 2 pairs per microbatch on each process for its mismatched pairs '
                            f'(z0); batch_size={batch_size} / (gradient_accumulation_steps={accumulation} × '
                            f'{n_processes} processes) is less; raise batch_size')
    return problems


def to_plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def model_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    problems = []
    if get('model.block_name') is None and parallelism is not None:
        needs = ('trainer=FSDPTrainer (it shards the model block by block)' if parallelism.trainer == 'FSDPTrainer' else
                 'activation_checkpointing=true with trainer=TensorParallelTrainer (it wraps each block)'
                 if parallelism.tensor_parallel and get('activation_checkpointing') else None)
        if needs:
            problems.append(f'model.block_name is null, but {needs} needs the class name of a transformer block; set '
                            f'e.g. model.block_name=GPTNeoXLayer (Pythia), LlamaDecoderLayer or GPT2Block')
    if isinstance(get('model.name_or_path'), str):
        problems += model_directory_problems(get('model.name_or_path'), get('model.tokenizer_name_or_path'),
                                             get('trust_remote_code') is True)
    return problems + precision_problems(get(''))


def path_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    """Files the run reads or writes, checked before anything is loaded."""
    problems = []
    local_dirs = get('local_dirs')
    if local_dirs and not isinstance(local_dirs, str) and not writable(first_existing_or_last(local_dirs)):
        problems.append(f'local_dirs={list(local_dirs)}: cannot write to {first_existing_or_last(local_dirs)} (the '
                        f'first that exists, else the last); set local_dirs=[a directory you can write to]')
    archive = get('model.archive')
    # the archive and the resumed run are on rank 0's disk only when the nodes share none: rank 0 checks them
    if archive is not None and holds_rank0_files() and not Path(str(archive)).is_file():
        problems.append(f'model.archive={archive} does not exist; pass the policy.pt of an SFT run '
                        f'(RUN_DIR/LATEST/policy.pt)')
    train_pairs = get('synthetic.train_pairs')
    if train_pairs is not None and not Path(str(train_pairs)).expanduser().is_file():
        problems.append(f'synthetic.train_pairs={train_pairs} does not exist; write it with `python scripts/sample_pairs.py '
                        f'SFT_RUN_DIR --out {train_pairs}`, or set synthetic.train_pairs=null for the generated pairs')
    resume_from = get('resume_from')
    resumable = resume_from is None or (Path(str(resume_from)) / 'LATEST' / 'policy.pt').is_file()
    if holds_rank0_files() and not resumable:
        problems.append(f'resume_from={resume_from} has no complete checkpoint (no LATEST/policy.pt); pass the run '
                        f'directory of an earlier run')
    for name in get('datasets') or []:
        problems += dataset_path_problems(str(name))
    return problems


def dataset_path_problems(name: str) -> List[str]:
    """A `datasets=` entry that names a local path (hh:PATH, a path-like generic entry) which does not exist."""
    from data_sources import SOURCES
    prefix, colon, location = name.partition(':')
    path = location if colon and prefix in SOURCES else name if name.startswith(('/', '.', '~')) else None
    if path and not Path(path).expanduser().exists():
        return [f'datasets=[{name}]: {path} does not exist; give an existing file or directory (a directory holds '
                f'train.* and test.*)']
    return []


def secret_problems(get: Callable, parallelism: Optional[Parallelism], loss_defaults) -> List[str]:
    """Secrets (WANDB_API_KEY, the judge endpoint's OPENAI_API_KEY, HF_TOKEN, ...) are read from the environment
    only: a config value that holds one (say, through ${oc.env:...}) would be written to config.yaml, the logs and
    wandb, so it is refused."""
    secrets = {name: value for name, value in os.environ.items()
               if any(word in name.upper() for word in SECRET_NAME_PARTS) and len(value) >= 8}
    problems = []
    for key in flat_items(OmegaConf.to_container(get(''), resolve=False)):
        value = str(get(key))
        problems += [f'{key} holds the value of the environment variable {name}, a secret, which would be written to '
                     f'config.yaml, the logs and wandb; secrets are read from the environment only, so remove it from '
                     f'the config' for name, secret in secrets.items() if secret in value]
    return problems


# An environment variable whose name contains one of these holds a secret (secret_problems).
SECRET_NAME_PARTS = ('API_KEY', 'TOKEN', 'SECRET', 'PASSWORD')


def first_existing_or_last(local_dirs: List[str]) -> Path:
    """The directory under which get_local_dir puts the run and the caches (not created here)."""
    return Path(next((d for d in local_dirs if os.path.exists(d)), local_dirs[-1]))


def writable(path: Path) -> bool:
    """Whether `path` is a writable directory, or could be created as one (its nearest existing ancestor is)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
