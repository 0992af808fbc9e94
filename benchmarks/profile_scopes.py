"""Where a profiled training step's time goes, by kind of work: bench_step.py --profile DIR uses this.

    python benchmarks/bench_step.py --models smollm2 --data hh --lora 16 --no-sft --no-precomputed --modes DPO \
        --max-length 128 --steps 4 --repeats 1 --no-trl --profile /tmp/profile    # DIR/<row>.scopes.json

`module_scopes(model)` wraps every submodule's forward in a torch.profiler range named after its kind (attention
projections, MLP, LoRA adapters, norms, attention, embedding); `breakdown(events)` then sums every operator's self
CPU time by (pass, kind): the pass is the reference's forward (`reference_scope`), the policy's forward, backward (an autograd node's work, attributed through its sequence
number to the forward operator that made it, hence to that operator's module) or optimizer; matmuls are counted
by their module, SDPA by its kernel, the rest of the attention module (rotary embeddings, reshapes) apart.
"""
from collections import defaultdict

import torch
from torch.autograd.profiler import record_function

MATMULS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')
KINDS = {'q_proj': 'attention projections', 'k_proj': 'attention projections', 'v_proj': 'attention projections',
         'o_proj': 'attention projections', 'gate_proj': 'MLP', 'up_proj': 'MLP', 'down_proj': 'MLP',
         'lora_A': 'LoRA adapters', 'lora_B': 'LoRA adapters', 'embed_tokens': 'embedding', 'lm_head': 'head'}


def kind_of(name: str, module: torch.nn.Module) -> str:
    leaf = name.rsplit('.', 1)[-1]
    if name.split('.')[-2:-1] in (['lora_A'], ['lora_B']):
        return 'LoRA adapters'
    if leaf in KINDS:
        return KINDS[leaf]
    cls = type(module).__name__
    if 'Norm' in cls:
        return 'norms'
    if 'Rotary' in cls:
        return 'rotary'
    if 'Attention' in cls:
        return 'attention (besides projections)'
    if 'MLP' in cls:
        return 'MLP'
    return 'other'


def module_scopes(model: torch.nn.Module) -> None:
    """Forward pre/post hooks that open and close a `module::<kind>` profiler range around each submodule."""
    stack = []

    def pre(module, args, kind):
        scope = record_function(f'module::{kind}')
        scope.__enter__()
        stack.append(scope)

    def post(module, args, output):
        stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        kind = kind_of(name, module)
        if kind != 'other':
            module.register_forward_pre_hook(lambda m, a, kind=kind: pre(m, a, kind))
            module.register_forward_hook(post)


def reference_scope(reference) -> None:
    """The trainer's reference log-probabilities (reference_cache.ReferenceLogps) inside a `module::reference` range,
    so that its forward pass counts apart even when it runs through the policy's modules (LoRA's adapters off).
    A subclass of the object's own class, for the profiled child process only."""
    base = type(reference)

    def scoped_call(self, batch):
        with record_function('module::reference'):
            return base.__call__(self, batch)

    reference.__class__ = type(f'Profiled{base.__name__}', (base,), {'__call__': scoped_call})


def classify(event, scope: str) -> str:
    name = event.name
    if 'scaled_dot_product' in name or 'flash_attention' in name:
        return 'SDPA kernel'
    if name in MATMULS or name in ('aten::matmul', 'aten::linear'):
        shapes = str(event.input_shapes)
        if scope in ('module::other', None) and '49152' in shapes:
            return 'matmul: head'
        return f'matmul: {scope.split("::")[-1] if scope else "outside modules"}'
    if scope is None:
        return 'outside modules (head softmax, loss, metrics)'
    return f'{scope.split("::")[-1]}: non-matmul'


def breakdown(events) -> dict:
    """{pass: {kind: self CPU µs}} over the profiled events (torch.profiler's `events()`)."""
    scope_of_seq = {}
    info = {}
    for event in events:  # first the forward operators' scopes, by autograd sequence number
        scope, phase, parent = None, 'forward', event.cpu_parent
        while parent is not None:
            if scope is None and parent.name.startswith('module::'):
                scope = parent.name
            if parent.name.startswith('autograd::engine::evaluate_function'):
                phase = 'backward'
                info[event.id] = (phase, parent)
                break
            if parent.name.startswith('Optimizer.'):
                phase = 'optimizer'
                break
            if parent.name == 'module::reference':
                phase = 'reference forward'
                break
            parent = parent.cpu_parent
        if phase == 'forward' and event.sequence_nr >= 0 and scope is not None:
            scope_of_seq.setdefault(event.sequence_nr, scope)
        if phase != 'backward':
            info[event.id] = (phase, scope)
    totals = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.name.startswith(('module::', 'autograd::engine::evaluate_function', 'Optimizer.', 'ProfilerStep')):
            continue
        phase, where = info[event.id]
        if phase == 'backward':
            node = where
            seq = node.sequence_nr if node.sequence_nr >= 0 else next(
                (c.sequence_nr for c in node.cpu_children if c.sequence_nr >= 0), -1)
            scope = scope_of_seq.get(seq)
        else:
            scope = where
        kind = phase if phase in ('optimizer', 'reference forward') else classify(event, scope)
        totals[phase][kind] += event.self_cpu_time_total
    return {phase: dict(kinds) for phase, kinds in totals.items()}
