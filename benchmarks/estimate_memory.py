"""Peak GPU memory per GPU of a train.py run, before any GPU is paid for: one JSON line.

    python benchmarks/estimate_memory.py <train.py overrides> n_gpus=N gpu_memory_gib=80
    python benchmarks/estimate_memory.py model=pythia28 loss=dpo trainer=FSDPTrainer batch_size=64 \\
        gradient_accumulation_steps=2 model.fsdp_policy_mp=bfloat16 n_gpus=4 gpu_memory_gib=80

prints {"peak_gib_per_gpu", "fits", "parts_gib": {parameters, gradients, optimizer_state, reference, activations,
head, communication_buffers}, ...}. The peak is parameters + optimizer state + reference + the larger of (activations +
head + communication buffers + the gradients of a step's earlier microbatches), the start of a backward pass, and
(gradients + communication buffers), the end of a step: the parts do not all coexist. It follows the code path of the run, not a formula alone:
  - the model is built on the meta device (no memory) from the preset's config (its config.json; for a Hub id
    without network, the shape of KNOWN_SHAPES), with LoRA's adapters added by lora.py as the run adds them;
  - the optimizer state is that of the real torch.optim class of `optimizer`, stepped once on the meta parameters;
  - the activations are what autograd saves in the policy's forward of one microbatch per GPU (batch_size /
    (gradient_accumulation_steps · data-parallel processes) pairs, chosen and rejected, every sequence padded to
    max_length), recorded with saved_tensors_hooks in a meta-device forward in the compute dtype, with the model's own
    activation checkpointing when activation_checkpointing=true (then one block's activations recomputed on top);
  - FSDP's sharding: each parameter's first dimension padded to a multiple of the processes (FSDP2's Shard(0));
    between microbatches of a step the gradients stay unsharded in float32 with fsdp_gradient_sync=step (the default;
    FSDPTrainer.no_sync_unless), sharded with fsdp_gradient_sync=microbatch; the root
    module (embeddings, final norm, head) stays unsharded from the forward to the end of the backward; two blocks are
    unsharded at once (the running one and the prefetched next) and one block's gradients wait for their reduce-scatter.
The head is logps.py's chunked head: a chunk × vocabulary float32 buffer, the float32 accumulator of the head's weight
gradient, and the labelled hidden rows. Not counted: the CUDA context (about 0.5 GiB) and the caching allocator's
fragmentation; `fits` therefore asks for 10% of the GPU to spare. Validated on CPU against the measured peak of the same
step for small shapes (tests/test_estimate_memory.py).
"""
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

GIB = 2 ** 30
# Shapes of Hub models the presets name, for estimates without network (their config.json's values)
KNOWN_SHAPES = {
    'EleutherAI/pythia-1.4b': ('gpt_neox', dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                                                intermediate_size=8192, vocab_size=50304, rotary_pct=0.25,
                                                max_position_embeddings=2048, tie_word_embeddings=False)),
    'EleutherAI/pythia-2.8b': ('gpt_neox', dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                                                intermediate_size=10240, vocab_size=50304, rotary_pct=0.25,
                                                max_position_embeddings=2048, tie_word_embeddings=False)),
    'EleutherAI/pythia-6.9b': ('gpt_neox', dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                intermediate_size=16384, vocab_size=50432, rotary_pct=0.25,
                                                max_position_embeddings=2048, tie_word_embeddings=False)),
    'meta-llama/Llama-3.1-8B': ('llama', dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                              max_position_embeddings=131072, rope_theta=500000.0,
                                              tie_word_embeddings=False)),
}
KNOWN_SHAPES['meta-llama/Meta-Llama-3-8B'] = KNOWN_SHAPES['meta-llama/Llama-3.1-8B']
BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


def parse(argv: List[str]) -> Tuple[List[str], int, float]:
    """(train.py overrides, n_gpus, gpu_memory_gib) from the command line."""
    n_gpus, memory, overrides = 1, 80.0, []
    for arg in argv:
        if arg.startswith('n_gpus='):
            n_gpus = int(arg.split('=', 1)[1])
        elif arg.startswith('gpu_memory_gib='):
            memory = float(arg.split('=', 1)[1])
        else:
            overrides.append(arg)
    return overrides, n_gpus, memory


def compose_config(overrides: List[str]):
    """The config train.py would see for these overrides (local_run_dir not resolved: nothing is written)."""
    from hydra import compose, initialize_config_dir
    import train
    train.register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / 'config'), version_base=None):
        return compose(config_name='config', overrides=overrides)


def hf_config(config):
    """The transformers config of config.model.name_or_path: its config.json, else KNOWN_SHAPES."""
    import transformers
    name = config.model.name_or_path
    if name in KNOWN_SHAPES:
        model_type, shape = KNOWN_SHAPES[name]
        return transformers.AutoConfig.for_model(model_type, **shape)
    from models import materialize_model
    from utils import get_local_dir
    return transformers.AutoConfig.from_pretrained(materialize_model(name, get_local_dir(config.local_dirs)))


class FlashLikeAttention(torch.autograd.Function):
    """What a GPU's fused attention (FlashAttention, PyTorch's memory-efficient kernel; both used by sdpa on CUDA
    with or without a padding mask) keeps for its backward pass: q, k, v, the output and a float32 logsumexp per
    query and head; never the (sequence × sequence) scores. On the meta device sdpa takes its math path instead,
    which would count those scores in float32. Outputs carry no values (meta)."""

    @staticmethod
    def forward(ctx, query, key, value):
        batch, heads, length, dim = query.shape
        out = torch.empty(batch, length, heads, dim, dtype=query.dtype, device=query.device)
        logsumexp = torch.empty(batch, heads, length, dtype=torch.float32, device=query.device)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def flash_like_attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function (AttentionInterface) of FlashLikeAttention: (output (B, T, H, D), None)."""
    return FlashLikeAttention.apply(query, key, value), None


def meta_model(model_config, dtype: str, config, lora: bool) -> nn.Module:
    """The model on the meta device in `dtype`, with LoRA's adapters as lora.add_adapters adds them, its attention
    FlashLikeAttention."""
    import transformers
    transformers.AttentionInterface.register('fused_estimate', flash_like_attention)
    with torch.device('meta'):
        model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype),
                                                              attn_implementation='fused_estimate')
    if lora:
        from lora import add_adapters
        with torch.device('meta'):
            model = add_adapters(model, config)
    return model


def optimizer_state(params: List[nn.Parameter], config) -> List[Tuple[torch.Size, int]]:
    """(shape, bytes per element) of every state tensor of the run's optimizer after one step over `params`."""
    optimizer_class = getattr(torch.optim, config.optimizer)
    kwargs = {'foreach': False} if 'foreach' in optimizer_class.__init__.__code__.co_varnames else {}
    optimizer = optimizer_class(params, lr=float(config.lr), **kwargs)
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer.step()
    states = [(t.shape, t.element_size(), id(p)) for p in params for t in optimizer.state[p].values()
              if torch.is_tensor(t) and t.dim() > 0]
    for p in params:
        p.grad = None
    return states


def saved_bytes(model: nn.Module, pairs: int, length: int) -> int:
    """Bytes autograd saves (parameters excluded, each storage once) in the forward of the model's base model over
    2·pairs sequences of `length` tokens, on the meta device."""
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}  # their views (transposes) too
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in parameters:
            storages[storage._cdata] = storage.nbytes()
        return t
    base = model.get_decoder() if hasattr(model, 'get_decoder') else model
    ids = torch.zeros(2 * pairs, length, dtype=torch.long, device='meta')
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # a 4-D causal mask, as padded batches get, used as it is: a 2-D one would be inspected by value (.all())
        mask = torch.ones(ids.shape[0], 1, length, length, dtype=torch.bool, device='meta').tril()
        out = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    del out
    return sum(storages.values())


def sharded_bytes(shapes_and_sizes, n: int, fsdp: bool) -> int:
    """Bytes per process of tensors split over n processes: FSDP2 pads each tensor's first dimension to a multiple
    of n (Shard(0)); a layer-wise split (BasicTrainer's device_map, TP) divides the total."""
    if fsdp:
        return sum(math.ceil(shape[0] / n) * math.prod(shape[1:]) * size if len(shape) else size
                   for shape, size in shapes_and_sizes)
    return math.ceil(sum(math.prod(shape) * size for shape, size in shapes_and_sizes) / n)


def estimate(config, n_gpus: int, gpu_memory_gib: float) -> dict:
    """The per-GPU peak and its parts, in GiB (see the module docstring)."""
    from lora import lora_enabled
    from losses import LossMode
    from utils import get_block_modules
    trainer, lora = config.trainer, lora_enabled(config)
    fsdp, tp = trainer == 'FSDPTrainer', trainer == 'TensorParallelTrainer'
    data_parallel = n_gpus if fsdp else 1
    with_reference = LossMode.from_config(config.loss).uses_reference_model
    compute = (config.model.fsdp_policy_mp if fsdp and config.model.fsdp_policy_mp else
               config.policy_autocast if not fsdp and config.policy_autocast else config.model.policy_dtype)
    model_config = hf_config(config)
    policy = meta_model(model_config, config.model.policy_dtype, config, lora)
    trained = [p for p in policy.parameters() if p.requires_grad]
    all_params = [(p.shape, p.element_size()) for p in policy.parameters()]
    parts = {'parameters': sharded_bytes(all_params, n_gpus, fsdp),
             'gradients': sharded_bytes([(p.shape, p.element_size()) for p in trained], n_gpus, fsdp),
             'optimizer_state': sharded_bytes([s[:2] for s in optimizer_state(trained, config)], n_gpus, fsdp)}
    accumulation = int(config.gradient_accumulation_steps)
    # fsdp_gradient_sync=step (FSDPTrainer.no_sync_unless): unsharded float32 (reduce dtype) gradients until the last
    # microbatch
    deferred_sync = fsdp and accumulation > 1
    unsharded_accumulated = sum(p.numel() for p in trained) * 4 if deferred_sync else 0
    if config.fsdp_gradient_sync == 'step':
        parts['gradients'] += unsharded_accumulated
    reference_dtype = config.model.policy_dtype if lora else config.model.reference_dtype
    reference_params = [(p.shape, BYTES[reference_dtype]) for p in policy.parameters()]
    parts['reference'] = (sharded_bytes(reference_params, n_gpus, fsdp)
                          if with_reference and not lora and not config.precompute_ref_log_probs else 0)

    pairs = max(1, int(config.batch_size) // (accumulation * data_parallel))
    length = int(config.max_length)
    compute_policy = meta_model(model_config, compute, config, lora)
    layers = model_config.num_hidden_layers
    plain = saved_bytes(compute_policy, pairs, length)
    if config.activation_checkpointing:
        from models import enable_activation_checkpointing
        enable_activation_checkpointing(compute_policy)
        compute_policy.train()
        activations = saved_bytes(compute_policy, pairs, length) + plain / layers  # + one block recomputed
    else:
        activations = plain
    if with_reference and not config.precompute_ref_log_probs:  # the reference's forward after the policy's: one
        # block's intermediates at a time
        activations += plain / layers * BYTES[reference_dtype] / BYTES[compute]
    parts['activations'] = activations / (n_gpus if trainer == 'BasicTrainer' else 1)

    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    tokens = 2 * pairs * length
    labelled = 2 * pairs * max(1, length - int(config.max_prompt_length))  # the responses: what the head projects
    chunk = config.logps_chunk_size
    # the head weight's float32 gradient accumulator, and its copy in the compute dtype: the head's backward runs
    # first, so they exist while every activation is still alive
    accumulator = 0 if lora else vocab * hidden * (4 + (BYTES[compute] if compute != 'float32' else 0))
    if chunk:
        parts['head'] = min(labelled, chunk) * vocab * 4 + labelled * hidden * BYTES[compute] + accumulator
    else:
        parts['head'] = 2 * tokens * vocab * 4
    if tp:
        parts['head'] = parts['head'] + (min(labelled, chunk or labelled) * vocab * 4)  # the gathered chunk's logits

    blocks = get_block_modules(policy, config.model.block_name) if config.model.block_name else []
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
    block_params = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in policy.parameters() if id(p) not in block_params)
    if fsdp:
        parts['communication_buffers'] = (2 * largest_block * BYTES[compute] + root * BYTES[compute]
                                          + largest_block * 4)
    elif tp:
        parts['communication_buffers'] = 2 * tokens * hidden * BYTES[compute]
    else:
        parts['communication_buffers'] = 0
    # Gradients and activations coexist only in part: at the start of a microbatch's backward pass (the peak) every
    # activation is alive and the gradients are those of the step's earlier microbatches (none without accumulation;
    # FSDP's unsharded float32 ones, counted above); at the end of the step the gradients are whole and the
    # activations gone.
    static = parts['parameters'] + parts['optimizer_state'] + parts['reference']
    sharded_gradients = parts['gradients'] - (unsharded_accumulated if config.fsdp_gradient_sync == 'step' else 0)

    def peak_bytes(sync: str) -> int:
        if not fsdp:
            earlier_gradients, gradients = (parts['gradients'] if accumulation > 1 else 0), parts['gradients']
        elif sync == 'step':
            earlier_gradients, gradients = unsharded_accumulated, sharded_gradients + unsharded_accumulated
        else:  # reduce-scattered after every microbatch: the earlier microbatches' gradients are sharded
            earlier_gradients, gradients = (sharded_gradients if accumulation > 1 else 0), sharded_gradients
        backward_start = parts['activations'] + parts['head'] + parts['communication_buffers'] + earlier_gradients
        return static + max(backward_start, gradients + parts['communication_buffers'])

    peak = peak_bytes(config.fsdp_gradient_sync)
    extra = {}
    if deferred_sync:  # the other choice of fsdp_gradient_sync, for the same run
        other = 'microbatch' if config.fsdp_gradient_sync == 'step' else 'step'
        extra[f'peak_gib_if_fsdp_gradient_sync_{other}'] = round(peak_bytes(other) / GIB, 3)
    return {'peak_gib_per_gpu': round(peak / GIB, 3), 'fits': peak <= 0.9 * gpu_memory_gib * GIB,
            'gpu_memory_gib': gpu_memory_gib, 'n_gpus': n_gpus, 'trainer': trainer,
            'parts_gib': {k: round(v / GIB, 3) for k, v in parts.items()},
            'model': config.model.name_or_path, 'parameters_total': sum(math.prod(s) for s, _ in all_params),
            'parameters_trained': sum(p.numel() for p in trained), 'microbatch_pairs_per_gpu': pairs,
            'max_length': length, 'compute_dtype': compute,
            'activation_checkpointing': bool(config.activation_checkpointing), 'lora_r': int(config.lora.r), **extra}


def main(argv: Optional[List[str]] = None) -> dict:
    overrides, n_gpus, memory = parse(sys.argv[1:] if argv is None else argv)
    result = estimate(compose_config(overrides), n_gpus, memory)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
