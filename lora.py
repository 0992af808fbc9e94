"""LoRA adapters on the policy (Hu et al. 2021, through peft): building them, their checkpoints, archives and export.

    python train.py loss=sft lora.r=16                                   # only the adapters train
    python train.py loss=dpo loss.beta=0.1 lora.r=16 model.archive=SFT_RUN/LATEST/policy.pt   # reference: adapters off

    from lora import add_adapters, adapters_disabled, lora_enabled
    policy = add_adapters(model, config)          # a peft model: base weights frozen, W + (α/r)·B·A
    with adapters_disabled(policy):               # the same weights as the frozen reference
        ...

With `lora.r` > 0 the policy is the base model (model.name_or_path, with model.archive merged in) plus low-rank
adapters on its attention and MLP projections; only the adapters get gradients and optimizer state. The DPO
family's reference log-probabilities come from the same weights with the adapters switched off (peft's
`disable_adapter`), so no second model is held in memory; the reference is exactly the model the run started
from.

A LoRA run's `policy.pt` holds the adapter tensors only (keyed as the policy's state dict names them) and, under
'lora', what is needed to rebuild the model: r, α, the adapted modules, the base model's name and the resolved
path of the archive the run started from. Given as `model.archive` to a later run, the adapter is merged into
its base (W ← W + (α/r)·B·A, after that archive's own archive, recursively), so the later run starts from,
and takes as reference, exactly the weights the LoRA run ended with. Keep the archives of such a chain where
they are, or pass the run's merged `hf_model/` as `model.name_or_path` instead.
"""
import contextlib
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig


# The name peft gives the one adapter of a run (in the policy's state-dict keys: `lora_A.default.weight`).
ADAPTER_NAME = 'default'


def lora_enabled(config: DictConfig) -> bool:
    """Whether the run trains LoRA adapters (lora.r > 0) instead of all weights."""
    return config.lora.r > 0


def projection_types():
    """The module classes LoRA can adapt here: nn.Linear, and GPT-2's Conv1D (a Linear with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D
    return nn.Linear, Conv1D


def default_target_modules(model: nn.Module) -> List[str]:
    """The attention and MLP projections of `model`: the names of its linear layers other than the output head
    (peft's own 'all-linear' rule), in order of appearance.

    GPT-NeoX: query_key_value, dense, dense_h_to_4h, dense_4h_to_h. Llama: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj. GPT-2: c_attn, c_proj, c_fc. The head and the embeddings are never adapted (the
    LoRA paper adapts the attention weights; QLoRA, Dettmers et al. 2023, §4, found that adapting every linear
    layer of the blocks is needed to match full fine-tuning).
    """
    head = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        short = name.rsplit('.', 1)[-1]
        if isinstance(module, projection_types()) and module is not head and short not in names:
            names.append(short)
    return names


def target_modules(model: nn.Module, config: DictConfig) -> List[str]:
    """lora.target_modules, or the model's attention and MLP projections when null; ValueError naming the key for
    a name that matches no linear layer of the model."""
    if config.lora.target_modules is None:
        return default_target_modules(model)
    wanted = list(config.lora.target_modules)
    linear = sorted({name.rsplit('.', 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, projection_types())})
    unknown = [name for name in wanted if name not in linear]
    if unknown:
        raise ValueError(f'lora.target_modules={wanted}: {unknown} name no linear layer of {type(model).__name__}; '
                         f'its linear layers are {linear} (null adapts the attention and MLP projections)')
    return wanted


def add_adapters(model: nn.Module, config: DictConfig) -> nn.Module:
    """`model` with fresh LoRA adapters (a peft PeftModelForCausalLM; every base weight frozen).

    A is drawn from config.seed (peft's Kaiming-uniform init), B is zero, so the policy starts equal to the
    model: the first DPO loss is ln 2. The draw does not touch the caller's random state.
    """
    import peft
    targets = target_modules(model, config)
    fan_in_fan_out = any(isinstance(module, projection_types()[1]) for name, module in model.named_modules()
                         if name.rsplit('.', 1)[-1] in targets)
    lora_config = peft.LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                  target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias='none',
                                  task_type='CAUSAL_LM')
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning on every run)
        warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing', category=FutureWarning)
        torch.manual_seed(config.seed)
        return peft.get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)


@contextlib.contextmanager
def adapters_disabled(policy: nn.Module) -> Iterator[None]:
    """The policy computes as the reference model inside this context: with its base weights only, in eval mode
    as a separate frozen reference is (reference_cache.ReferenceLogps), so nothing that behaves differently in
    training (dropout a config left on, a model's own train-mode behaviour) reaches π_ref. Each module's mode is
    restored afterwards."""
    modes = [(module, module.training) for module in policy.modules()]
    policy.eval()
    try:
        with policy.disable_adapter():
            yield
    finally:
        for module, training in modes:
            module.training = training


def archive_info(policy: nn.Module, config: DictConfig) -> Dict:
    """What a LoRA run's policy.pt keeps under 'lora' besides the adapter tensors: what rebuilds its model."""
    lora_config = policy.peft_config[ADAPTER_NAME]
    archive = config.model.archive
    return {'r': lora_config.r, 'alpha': lora_config.lora_alpha, 'target_modules': sorted(lora_config.target_modules),
            'fan_in_fan_out': lora_config.fan_in_fan_out, 'base_model': config.model.name_or_path,
            'base_archive': None if archive is None else str(Path(archive).expanduser().resolve())}


def trainable_state(policy: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The entries of the policy's `state` dict that are trainable parameters (the adapters)."""
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    return {name: value for name, value in state.items() if name in trainable}


def load_adapter_state(policy: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load a LoRA checkpoint's adapter tensors into the policy; ValueError naming `source` on a mismatch."""
    expected = {name: p.shape for name, p in policy.named_parameters() if p.requires_grad}
    mismatched = sorted(set(expected) ^ set(state)) + sorted(
        name for name in set(expected) & set(state) if tuple(state[name].shape) != tuple(expected[name]))
    if mismatched:
        raise ValueError(f'{source} holds adapters that do not fit this LoRA policy (first of {len(mismatched)} '
                         f'differences: {mismatched[0]}); resume with the lora.* and model.* settings of its run')
    policy.load_state_dict(state, strict=False)


def delta_weights(adapter: Dict[str, torch.Tensor], info: Dict) -> Dict[str, torch.Tensor]:
    """{base weight name: (α/r)·B·A} of an adapter state ('…X.lora_A.default.weight' keys of a peft model), keyed
    by the plain model's names ('X.weight'); transposed for Conv1D layers (fan_in_fan_out). Float32."""
    scaling = info['alpha'] / info['r']
    deltas = {}
    for key, a in adapter.items():
        if '.lora_A.' not in key:
            continue
        module = key.split('.lora_A.')[0].removeprefix('base_model.model.')
        b = adapter[key.replace('.lora_A.', '.lora_B.')]
        delta = scaling * (b.float() @ a.float())
        deltas[f'{module}.weight'] = delta.T if info['fan_in_fan_out'] else delta
    return deltas


def merged_state_dict(peft_state: Dict[str, torch.Tensor], info: Dict) -> Dict[str, torch.Tensor]:
    """The plain model's state dict (from_pretrained names) with the adapters merged in, from a peft policy's full
    state dict: W + (α/r)·B·A for each adapted layer, computed in float32 and stored in W's dtype."""
    deltas = delta_weights(peft_state, info)
    merged = {}
    for key, value in peft_state.items():
        if '.lora_' in key:
            continue
        name = key.removeprefix('base_model.model.').replace('.base_layer.', '.')
        merged[name] = (value.float() + deltas[name]).to(value.dtype) if name in deltas else value
    return merged


@torch.no_grad()
def merge_adapter_into(model: nn.Module, adapter: Dict[str, torch.Tensor], info: Dict, source: str) -> None:
    """Add a LoRA archive's adapters to the plain `model`'s weights in place: W ← W + (α/r)·B·A."""
    parameters = dict(model.named_parameters())
    deltas = delta_weights(adapter, info)
    unknown = [name for name, delta in deltas.items()
               if name not in parameters or tuple(parameters[name].shape) != tuple(delta.shape)]
    if unknown:
        raise ValueError(f'{source}: its LoRA adapters do not fit the model {type(model).__name__} (first of '
                         f'{len(unknown)}: {unknown[0]}); use the model.* settings of the run that wrote it')
    for name, delta in deltas.items():
        weight = parameters[name]
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def peft_adapter_files(policy: nn.Module, adapter: Dict[str, torch.Tensor]):
    """(state dict in PEFT's file format, LoraConfig) of the policy's adapter, what `PeftModel.from_pretrained` reads."""
    import peft
    state = peft.get_peft_model_state_dict(policy, state_dict=adapter, adapter_name=ADAPTER_NAME,
                                           save_embedding_layers=False)
    return {name: value.contiguous() for name, value in state.items()}, policy.peft_config[ADAPTER_NAME]


def archive_chain_error(path: Path, base_archive: Optional[str]) -> Optional[str]:
    """Why a LoRA archive cannot be merged (its own archive is gone), or None."""
    if base_archive is not None and not Path(base_archive).is_file():
        return (f'model.archive={path} is a LoRA adapter trained on top of {base_archive}, which no longer exists; '
                f'restore that file, or pass the LoRA run\'s merged hf_model/ as model.name_or_path instead')
    return None


def merged_export(policy: nn.Module, state: Dict[str, torch.Tensor], config: DictConfig
                  ) -> Tuple[nn.Module, Dict[str, torch.Tensor], Tuple[Dict[str, torch.Tensor], object]]:
    """What a LoRA run exports (checkpoints.export_hf_model): the base model, its state dict with the adapters
    merged (W + (α/r)·B·A, loadable without peft), and the adapter alone in PEFT's format (for adapter/).
    state: the policy's full state dict."""
    merged = merged_state_dict(state, archive_info(policy, config))
    return policy.get_base_model(), merged, peft_adapter_files(policy, trainable_state(policy, state))
