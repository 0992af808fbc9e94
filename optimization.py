"""The optimizer and the learning-rate schedule of a run (config keys optimizer, lr, weight_decay, lr_scheduler,
warmup_steps), and how many optimizer steps a run takes."""
import inspect
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from omegaconf import DictConfig

from preference_datasets import load_tokenized

LR_SCHEDULES = ('constant', 'cosine', 'linear')  # lr_scheduler (config/config.yaml), after the warmup


def build_optimizer(params: List[torch.Tensor], config: DictConfig,
                    total_steps: Callable[[], int]) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer named by config.optimizer (with config.weight_decay) over `params`, and its lr schedule
    (`LRSchedule`); total_steps() is asked only by the schedules that decay."""
    optimizer_class = getattr(torch.optim, config.optimizer)
    kwargs = {'fused': True} if fused_optimizer_applies(optimizer_class, params) else {}
    if config.weight_decay is not None:
        kwargs['weight_decay'] = config.weight_decay
    optimizer = optimizer_class(params, lr=config.lr, **kwargs)
    schedule = config.lr_scheduler
    steps = None if schedule == 'constant' else total_steps()
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=LRSchedule(schedule, config.warmup_steps, steps))


def total_training_steps(config: DictConfig, data_kwargs: dict) -> int:
    """Optimizer steps of the whole run, as get_batch_iterator counts them: n_epochs over the training
    data (each epoch's last partial batch dropped) or ⌈n_examples / batch_size⌉, whichever ends first.
    data_kwargs: the trainer's arguments of get_batch_iterator."""
    batch_size, kwargs = config.batch_size, data_kwargs
    per_epoch = sum(load_tokenized(name, kwargs['tokenizer'], 'train', kwargs['max_length'], kwargs['max_prompt_length'],
                                   kwargs['sft_mode'], True, kwargs['cache_dir'], kwargs['dataset_options']).n_examples
                    for name in kwargs['names']) // batch_size
    candidates = []
    if config.n_epochs is not None:
        candidates.append(config.n_epochs * per_epoch)
    if config.n_examples is not None:
        candidates.append(-(-config.n_examples // batch_size))
    return max(1, min(candidates))


class LRSchedule:
    """The learning-rate factor of optimizer step t, LambdaLR's lr_lambda. LambdaLR saves a callable object's
    attributes in its state dict, so scheduler.pt carries the schedule and a resume restores it.

    Every schedule starts with the original's linear warmup, min(1, (t + 1)/(warmup_steps + 1)); after it
        constant: 1 (the original)
        cosine: ½·(1 + cos(π·p)),  linear: 1 − p,  p = (t − warmup_steps)/(total_steps − warmup_steps) in [0, 1]
    as transformers' get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup after their warmup: the
    factor is 1 at the end of the warmup and falls to 0 at total_steps.
    """

    def __init__(self, name: str, warmup_steps: int, total_steps: Optional[int] = None):
        if name not in LR_SCHEDULES or (name != 'constant' and total_steps is None):
            raise ValueError(f'lr_scheduler={name!r}: choose one of {", ".join(LR_SCHEDULES)} (decays need total_steps)')
        self.name = name
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if self.name == 'constant' or step < self.warmup_steps:
            return min(1.0, (step + 1) / (self.warmup_steps + 1))
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.name == 'cosine':
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress


def fused_optimizer_applies(optimizer_class: type, params: List[torch.Tensor]) -> bool:
    """Whether to ask `optimizer_class` for its fused kernel (one pass over each parameter instead of
    one per elementwise op: on a 2-core CPU, AdamW over 14M parameters takes 0.06 s instead of 0.56 s).

    PyTorch has fused Adam, AdamW, SGD and Adagrad for CPU and CUDA tensors; sharded (DTensor)
    parameters keep the default multi-tensor path, which every trainer supports.
    """
    accepts_fused = 'fused' in inspect.signature(optimizer_class).parameters
    plain = all(type(p) is nn.Parameter and p.device.type in ('cpu', 'cuda') and p.is_floating_point() for p in params)
    return accepts_fused and plain and len(params) > 0
