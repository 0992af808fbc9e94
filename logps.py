"""Log-probabilities of the label tokens, lean: the LM head only on labelled positions, a chunk at a time.

    from logps import concatenated_logps, forward_logps
    logps = forward_logps(model, input_ids, attention_mask, labels, chunk_size=2048)   # (batch,) float32
    chosen, rejected = concatenated_logps(model, batch, chunk_size=2048)   # both halves of a pair batch, one pass

A causal LM's logits over a 50k vocabulary are the largest tensor of a DPO step (batch × seq × vocab, in
float32 for the softmax). Here the model runs its own forward but projects one position only through its head;
the head is applied to the positions that carry a label only, chunk_size rows at a time, and the chunk's
logits are recomputed in the backward pass instead of kept. Equal to the plain computation
(`_get_batch_logps`, below) within 1e-5, gradients included (tests/test_lean_logps.py).
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor

from utils import UserError, first_fit, pad_to_length


class _ChunkedLabelLogps(torch.autograd.Function):
    """log p(y_i | h_i) = (W h_i + b)[y_i] − logsumexp(W h_i + b), a chunk of rows of the (N, V) logits at a time.

    Autograd through a plain loop would keep every chunk's float32 logits and log-softmax alive until the
    backward pass. This Function keeps h, W, b, the targets and the (N,) normalisers, and recomputes each
    chunk's logits in the backward pass: one more matmul per chunk for memory that no longer grows with
    the number of tokens (the trade Liger-Kernel's fused linear cross-entropy makes). When all N rows fit
    in one chunk, the backward pass would allocate that chunk anyway, so the forward keeps its softmax
    instead and the backward needs neither the matmul nor the exponentials again: the same peak, less time.
    All chunks share one float32 buffer updated in place: on CPUs a fresh 100 MB tensor per chunk costs
    more in page faults than the exponentials computed in it.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n = hidden.shape[0]
        keep_softmax = n <= chunk_size and any(ctx.needs_input_grad[:3])
        # equal chunks: a last chunk of a few rows would stream the whole weight for little work
        chunk_size = -(-n // -(-n // chunk_size)) if n > 0 else chunk_size
        token_logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        normalisers = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buffer = torch.empty(min(n, chunk_size), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight, bias, buffer)
            target_logits = logits.gather(1, targets[rows, None]).squeeze(1)
            normalisers[rows] = _softmax_and_logsumexp_(logits)
            token_logps[rows] = target_logits - normalisers[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, normalisers, buffer if keep_softmax else None)
        ctx.chunk_size = chunk_size
        ctx.backward_done = False
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        # ∂ log p(y_i) / ∂ logits_i = onehot(y_i) − softmax(logits_i), weighted by the incoming gradient g_i.
        if ctx.backward_done:
            raise RuntimeError('label_logps_from_hidden supports one backward pass per forward (its softmax is '
                               'reused in place)')
        ctx.backward_done = True
        hidden, weight, bias, targets, normalisers, softmax = ctx.saved_tensors
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # float32 accumulators: a bfloat16 weight's gradient summed over thousands of tokens would round away.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        if softmax is None:
            buffer = torch.empty(min(n, ctx.chunk_size), weight.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = grad_token_logps[rows].float().unsqueeze(1)
            if softmax is None:
                grad_logits = _chunk_logits(hidden[rows], weight, bias, buffer)
                grad_logits.sub_(normalisers[rows, None]).exp_()
            else:
                grad_logits = softmax
            grad_logits.mul_(-g).scatter_add_(1, targets[rows, None], g)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows].float())
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  buffer: torch.Tensor) -> torch.Tensor:
    """(rows, V) float32 logits of `hidden` (rows, H), written into the first rows of `buffer`.

    The product is taken in the weight's dtype, as the model's own head would, then held in float32.
    """
    out = buffer[:hidden.shape[0]]
    if weight.dtype == torch.float32:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return out.copy_(F.linear(hidden.to(weight.dtype), weight, bias))


def _softmax_and_logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """(rows,) logsumexp over the last dim of (rows, V) `logits`, which it overwrites with their softmax."""
    maxes = logits.amax(dim=1, keepdim=True)
    # a row of −inf logits would give nan in (logits − max); such a row has no probability to normalise
    maxes.masked_fill_(~torch.isfinite(maxes), 0)
    sums = logits.sub_(maxes).exp_().sum(dim=1, keepdim=True)
    logits.div_(sums)
    return sums.log_().add_(maxes).squeeze(1)


def label_logps_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: Optional[torch.Tensor],
                            labels: torch.Tensor, chunk_size: int = 1024,
                            average_log_prob: bool = False) -> torch.Tensor:
    """`_get_batch_logps(F.linear(hidden, head_weight, head_bias), labels, average_log_prob)` without the logits.

    Args:
        hidden: (batch, seq, hidden) final hidden states (after the last norm), position t predicts token t + 1.
        head_weight, head_bias: the output projection, (vocab, hidden) and (vocab,) or None.
        labels: (batch, seq) token ids, −100 where no loss is taken (prompt, padding).
        chunk_size: labelled tokens per block of the vocabulary projection; peak memory of the head is
            about 3 · chunk_size · vocab floats in the backward pass, instead of 2 · batch · seq · vocab.
        average_log_prob: the mean per labelled token instead of the sum.

    Returns:
        (batch,) float32, equal to the naive computation up to float32 rounding (same logits, same
        float32 log-softmax). Only the labelled positions are projected: prompts and padding carry no
        loss, and in preference data they are about half of every sequence.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f'hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree in (batch, seq)')
    loss_mask = labels[:, 1:] != -100
    token_logps = _ChunkedLabelLogps.apply(hidden[:, :-1][loss_mask], head_weight, head_bias,
                                           labels[:, 1:][loss_mask], chunk_size)
    return _per_sequence(token_logps, loss_mask, average_log_prob)


def _per_sequence(token_logps: torch.Tensor, loss_mask: torch.Tensor, average_log_prob: bool) -> torch.Tensor:
    """(batch,) sums (or means) of the (N,) labelled-token values, N = loss_mask.sum(), in row-major order.

    A row without labels gets 0, as in `_get_batch_logps`.
    """
    rows = loss_mask.nonzero()[:, 0]
    summed = torch.zeros(loss_mask.shape[0], dtype=torch.float32, device=token_logps.device)
    summed = summed.index_add(0, rows, token_logps.float())
    if average_log_prob:
        return summed / loss_mask.sum(-1).clamp(min=1)
    return summed


def sharded_head_label_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                             average_log_prob: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """(batch,) summed (or mean) label log-probabilities with `head` called as a module on the labelled positions only,
    chunk_size of them at a time.

    For a head whose weight is sharded over the vocabulary (tensor parallelism): the module's hooks gather its
    output, which `label_logps_from_hidden` could not do with the weight shard alone. Each chunk's full-vocabulary
    logits and their float32 log-softmax exist only while that chunk is computed: with gradients, each chunk runs
    under non-reentrant activation checkpointing (torch.utils.checkpoint), which keeps the chunk's hidden rows and
    recomputes its logits in the backward pass, so the head's memory is about 3 · chunk_size · vocabulary floats,
    not 2 · (labelled tokens of the microbatch) · vocabulary (5-8 GB at 32 pairs of 512 tokens and Pythia's
    50,304). Every tensor-parallel rank computes the same batch, so all take the same chunks and their gathers match.
    """
    loss_mask = labels[:, 1:] != -100
    rows = hidden[:, :-1][loss_mask]
    targets = labels[:, 1:][loss_mask]
    chunks = []
    for start in range(0, rows.shape[0], chunk_size):
        chunk = (head, rows[start:start + chunk_size], targets[start:start + chunk_size])
        if torch.is_grad_enabled():
            chunks.append(torch.utils.checkpoint.checkpoint(_head_chunk_logps, *chunk, use_reentrant=False))
        else:
            chunks.append(_head_chunk_logps(*chunk))
    token_logps = torch.cat(chunks) if chunks else torch.zeros(0, device=hidden.device)
    return _per_sequence(token_logps, loss_mask, average_log_prob)


def _head_chunk_logps(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 log p(target | row) through the `head` module, its output gathered if it is a DTensor."""
    logits = head(rows)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    return logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """Sum (or mean) of the log-probabilities of the label tokens.

    Args:
        logits: (batch, seq, vocab) unnormalised scores; position t predicts token t + 1.
        labels: (batch, seq) token ids, −100 where no loss is taken (prompt, padding).
        average_log_prob: return the mean per labelled token instead of the sum.

    Returns:
        (batch,) float32 log-probabilities. The log-softmax runs in float32 whatever the logits'
        dtype: in bfloat16 the normaliser of a 50k-token vocabulary loses about 3 significant
        digits, which is the size of the DPO log-ratios being compared.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f'logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree in (batch, seq)')
    labels = labels[:, 1:]
    logits = logits[:, :-1, :].float()
    loss_mask = labels != -100
    safe_labels = labels.masked_fill(~loss_mask, 0)
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=safe_labels.unsqueeze(2)).squeeze(2)
    summed = (per_token_logps * loss_mask).sum(-1)
    if average_log_prob:
        return summed / loss_mask.sum(-1).clamp(min=1)
    return summed


class HeadInput:
    """A forward pre-hook of a causal LM's output head: while `active`, it keeps what the model feeds its head (the
    last hidden state, after the final norm, for every position) in `hidden`, and hands the head its first position
    only, so the model's own forward computes (batch, 1, vocabulary) logits, which nothing uses. Not none: a
    tensor-parallel head (a DTensor weight) cannot propagate its sharding over an empty dimension (torch 2.13:
    'integer modulo by zero').

    Registered once per head (`head_input`) and left in place, so a compiled model (compile_policy) is traced
    with it once instead of recompiled for each new hook; `prepend=True`: before tensor parallelism's input
    hook, which would turn the hidden state into a DTensor. accelerate's device_map hooks wrap the module's
    `forward` instead and run after it, so `hidden` is on the device of the final norm, not necessarily the head's.
    """

    def __init__(self):
        self.active = False
        self.hidden: Optional[torch.Tensor] = None

    def __call__(self, module: nn.Module, args: Tuple):
        if not self.active:
            return None
        self.hidden = args[0]
        return (args[0].narrow(-2, 0, 1), *args[1:])


def head_input(head: nn.Module) -> HeadInput:
    """The HeadInput hook of `head`, registered on the first call."""
    hook = head.__dict__.get('_label_logps_head_input')
    if hook is None:
        hook = HeadInput()
        head.register_forward_pre_hook(hook, prepend=True)
        head.__dict__['_label_logps_head_input'] = hook
    return hook


def last_hidden_state(model: nn.Module, head: nn.Module, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], **model_kwargs) -> torch.Tensor:
    """(batch, seq, hidden): what `model`'s forward feeds its output `head`, from the model's own forward
    (model_kwargs: e.g. the packed rows' position_ids).

    The whole model runs (its head on one position only), not its base model alone: FSDP's root unshards the embeddings, final norm and head
    in its forward pre-hook, and peft's, torch.compile's and tensor parallelism's wrappers act on the model's
    call; the head's input is by construction the state the model's logits come from, whichever
    attribute holds the base model (`gpt_neox`, `model`, `transformer`) and wherever it puts its final norm.
    Works on every transformers 5.x (5.23's 2-D `logits_to_keep` mask and `output_hidden_states=-1` did this
    before, on 5.23 alone).
    """
    hook = head_input(head)
    hook.active = True
    try:
        model(input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    finally:
        hook.active = False
    hidden, hook.hidden = hook.hidden, None
    if hidden is None:
        raise RuntimeError(f'{type(model).__name__}: its forward did not call its output embeddings '
                           f'({type(head).__name__}); the log-probabilities need logps_chunk_size=null')
    return hidden


def head_device(head: nn.Module) -> torch.device:
    """The device the head's weight is on (for a DTensor: this rank's shard)."""
    weight = head.weight
    return (weight.to_local() if isinstance(weight, DTensor) else weight).device


def on_head_device(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`hidden` and `labels` on the head's device. BasicTrainer on several GPUs (device_map='balanced') puts an untied
    head (Pythia's embed_out) on the last GPU while the final norm, hence the hidden state, may sit elsewhere, and
    accelerate's device hooks, which move a module's inputs, wrap the head's forward, not this computation."""
    device = head_device(head)
    return hidden.to(device), labels.to(device)


def forward_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  chunk_size: Optional[int], average_log_prob: bool = False, pack_tokens: Optional[int] = None,
                  return_hidden: bool = False):
    """(batch,) summed (or, average_log_prob, mean) log-probabilities of the label tokens under `model` (a Hugging
    Face causal LM), on the device of `labels`.

    With chunk_size set, the model runs through its own forward (so FSDP's and tensor parallelism's hooks fire)
    but projects one position only through its head: `last_hidden_state` takes the head's input instead. The head is
    then applied to the labelled positions only, a chunk at a time (`label_logps_from_hidden`), on the head's
    own device (`on_head_device`). FSDP2 leaves the root module's parameters, the head's among them,
    unsharded after the forward, and reduces their gradients at the end of the backward pass, so the head's
    weight can be used here. A head whose weight stays sharded (tensor parallelism's colwise lm_head) is
    called as a module on chunks of the labelled positions instead (`sharded_head_label_logps`). Without
    chunk_size: the full logits and `_get_batch_logps`, as the original.
    return_hidden (chunk_size set): also the head's input, detached, (batch, seq, hidden) on the head's device, for
    ε-DPO's perturbed log-probabilities (`perturbed_label_logps`); returns (logps, hidden).
    """
    if return_hidden and (pack_tokens or not chunk_size):
        raise ValueError('return_hidden needs chunk_size and padded rows')
    if pack_tokens:
        return packed_logps(model, input_ids, attention_mask, labels, chunk_size, average_log_prob, pack_tokens)
    if not chunk_size:
        logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        return _get_batch_logps(logits, labels.to(logits.device), average_log_prob=average_log_prob).to(labels.device)
    head = model.get_output_embeddings()
    hidden = last_hidden_state(model, head, input_ids, attention_mask)
    hidden, head_labels = on_head_device(head, hidden, labels)
    # The head in float32 (or its own dtype) even under the policy's autocast: see _get_batch_logps.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if isinstance(head.weight, DTensor):
            logps = sharded_head_label_logps(head, hidden, head_labels, average_log_prob, chunk_size)
        else:
            logps = label_logps_from_hidden(hidden, head.weight, head.bias, head_labels, chunk_size, average_log_prob)
    if return_hidden:
        return logps.to(labels.device), hidden.detach()
    return logps.to(labels.device)


@torch.no_grad()
def perturbed_label_logps(policy_hidden: torch.Tensor, policy_head: nn.Module, reference_hidden: torch.Tensor,
                          reference_head: nn.Module, labels: torch.Tensor, epsilon: float, chunk_size: int,
                          average_log_prob: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ε-DPO's log-probabilities (losses.py, ε-DPO), without gradients: (reference, plus, minus), each (batch,),
    of the label tokens under log_softmax(z_ref), log_softmax((1+ε)·z_π − ε·z_ref) and log_softmax((1−ε)·z_π + ε·z_ref),
    z = W·h + b the per-token full-vocabulary logits of the policy and the reference.

    policy_hidden, reference_hidden: (batch, seq, hidden), the heads' inputs (`forward_logps(..., return_hidden=True)`,
    `last_hidden_state`); labels (batch, seq), −100 where no loss is taken. Only the labelled positions are projected,
    chunk_size rows at a time: at most two (chunk_size, vocab) float32 logits blocks live at once, never the whole
    (batch, seq, vocab) logits of either model. The reference's log-probabilities come from the same logits, so no
    separate reference pass is needed. The heads' weights must be whole on this rank (FSDP2 leaves the root's
    parameters unsharded after the forward; tensor parallelism's sharded head is refused by config_schema).
    """
    policy_hidden, head_labels = on_head_device(policy_head, policy_hidden, labels)
    loss_mask = head_labels[:, 1:] != -100
    rows_policy = policy_hidden[:, :-1][loss_mask]
    rows_reference = reference_hidden.to(rows_policy.device)[:, :-1][loss_mask]
    targets = head_labels[:, 1:][loss_mask]
    out = ([], [], [])
    with torch.autocast(device_type=rows_policy.device.type, enabled=False):
        for start in range(0, rows_policy.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z_policy = F.linear(rows_policy[rows].to(policy_head.weight.dtype), policy_head.weight,
                                policy_head.bias).float()
            z_reference = F.linear(rows_reference[rows].to(reference_head.weight.dtype),
                                   reference_head.weight.to(rows_policy.device),
                                   None if reference_head.bias is None else reference_head.bias.to(rows_policy.device)
                                   ).float()
            target = targets[rows].unsqueeze(1)
            for values, logits in zip(out, (z_reference, (1 + epsilon) * z_policy - epsilon * z_reference,
                                            (1 - epsilon) * z_policy + epsilon * z_reference)):
                values.append(logits.log_softmax(-1).gather(1, target).squeeze(1))
    empty = torch.zeros(0, device=rows_policy.device)
    return tuple(_per_sequence(torch.cat(v) if v else empty, loss_mask, average_log_prob).to(labels.device)
                 for v in out)


def concatenated_inputs(batch: Dict[str, Union[List, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Chosen and rejected tensors stacked into one batch of 2·B rows (chosen first), padded alike.

    One forward pass over both halves is faster than two, and under FSDP it gathers each shard once.
    """
    max_length = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
    concatenated = {}
    for suffix, pad_value in (('input_ids', 0), ('attention_mask', 0), ('labels', -100)):
        concatenated[f'concatenated_{suffix}'] = torch.cat([
            pad_to_length(batch[f'chosen_{suffix}'], max_length, pad_value),
            pad_to_length(batch[f'rejected_{suffix}'], max_length, pad_value),
        ], dim=0)
    return concatenated


def concatenated_logps(model: nn.Module, batch: Dict, chunk_size: Optional[int], average_log_prob: bool = False,
                       pack_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities under `model`, each (batch,), from one forward pass over both halves
    (`concatenated_inputs`, then `forward_logps`; packed without padding when pack_tokens is set)."""
    concatenated = concatenated_inputs(batch)
    all_logps = forward_logps(model, concatenated['concatenated_input_ids'], concatenated['concatenated_attention_mask'],
                              concatenated['concatenated_labels'], chunk_size, average_log_prob, pack_tokens)
    n = batch['chosen_input_ids'].shape[0]
    return all_logps[:n], all_logps[n:]


# ----- padding-free (packed) forward passes -----------------------------------------------------------------

def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, row_tokens: int
                   ) -> Dict[str, torch.Tensor]:
    """The real tokens of the (n, seq) right-padded batch packed into rows of at most `row_tokens` tokens, first fit.

    Sequences go, in order, into the first row with room for them (a sequence longer than row_tokens gets a row of its
    own); rows are padded to the longest row only. `position_ids` restart at 0 at each sequence, and its first label
    is −100, so no position predicts across a boundary. transformers' masking_utils (`find_packed_sequence_indices`,
    5.x) reads the restarts of position_ids when attention_mask is None and builds the block-diagonal causal mask for
    SDPA and eager attention (and flash-attention's variable-length path): no sequence attends to another.

    Returns input_ids, position_ids, labels (rows, L) and sequence (rows, L): the batch row each token came from,
    −1 on the row padding.
    """
    lengths = attention_mask.sum(-1).tolist()
    rows = first_fit(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    packed = {'input_ids': torch.zeros(shape, dtype=input_ids.dtype),
              'position_ids': torch.zeros(shape, dtype=torch.long),
              'labels': torch.full(shape, -100, dtype=labels.dtype),
              'sequence': torch.full(shape, -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            span = slice(start, start + lengths[i])
            real = attention_mask[i].bool()
            packed['input_ids'][r, span] = input_ids[i][real]
            packed['position_ids'][r, span] = torch.arange(lengths[i])
            packed['labels'][r, span] = labels[i][real]
            packed['labels'][r, start] = -100
            packed['sequence'][r, span] = i
            start += lengths[i]
        # the row's padding counts as one more sequence (positions from 0), attending to itself only
        packed['position_ids'][r, start:] = torch.arange(width - start)
    return {k: v.to(input_ids.device) for k, v in packed.items()}


def packed_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 chunk_size: Optional[int], average_log_prob: bool, row_tokens: int) -> torch.Tensor:
    """`forward_logps` of the (n, seq) batch, computed on its packed rows (`pack_sequences`): (n,) float32, the same
    values within float32 rounding, each sequence's labelled tokens summed from its own span."""
    packed = pack_sequences(input_ids, attention_mask, labels, row_tokens)
    n = input_ids.shape[0]
    if not chunk_size:
        logits = model(packed['input_ids'], attention_mask=None, position_ids=packed['position_ids'],
                       use_cache=False).logits
        plabels = packed['labels'].to(logits.device)
        loss_mask = plabels[:, 1:] != -100
        token_logps = logits[:, :-1][loss_mask].float().log_softmax(-1).gather(
            1, plabels[:, 1:][loss_mask][:, None]).squeeze(1)
    else:
        head = model.get_output_embeddings()
        hidden = last_hidden_state(model, head, packed['input_ids'], None, position_ids=packed['position_ids'])
        hidden, plabels = on_head_device(head, hidden, packed['labels'])
        loss_mask = plabels[:, 1:] != -100
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            if isinstance(head.weight, DTensor):
                rows = hidden[:, :-1][loss_mask]
                targets = plabels[:, 1:][loss_mask]
                token_logps = torch.cat([_head_chunk_logps(head, rows[s:s + chunk_size], targets[s:s + chunk_size])
                                         for s in range(0, rows.shape[0], chunk_size)])
            else:
                token_logps = _ChunkedLabelLogps.apply(hidden[:, :-1][loss_mask], head.weight, head.bias,
                                                       plabels[:, 1:][loss_mask], chunk_size)
    # token t + 1's label belongs to the sequence of token t + 1 (its first position is never labelled)
    owner = packed['sequence'][:, 1:].to(loss_mask.device)[loss_mask]
    summed = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(0, owner.to(token_logps.device),
                                                                                      token_logps.float())
    if average_log_prob:
        counts = torch.zeros(n, device=token_logps.device).index_add(
            0, owner.to(token_logps.device), torch.ones_like(token_logps, dtype=torch.float32))
        summed = summed / counts.clamp(min=1)
    return summed.to(labels.device)


def check_packing(model: nn.Module, device: torch.device) -> None:
    """Raise a UserError naming the model type if `model`'s attention does not keep packed sequences apart.

    Measured, not listed: two sequences of 6 tokens, packed in one row, must get the log-probabilities they get
    apart. A model whose forward ignores position_ids, or builds its mask without masking_utils' packed-sequence
    detection, lets the second sequence attend to the first and fails. Measured on transformers 5.23: GPT-NeoX,
    Llama and GPT-2 (absolute positions, which take position_ids too) pass, with SDPA and eager attention.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    with torch.no_grad():
        apart = forward_logps(model, ids, mask, labels, None)
        packed = forward_logps(model, ids, mask, labels, None, pack_tokens=12)
    if not torch.allclose(apart, packed, rtol=1e-3, atol=1e-3):
        model_type = getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)
        raise UserError(f'padding_free=true: model type {model_type!r} does not keep packed sequences apart (its '
                        f'attention ignores the restarts of position_ids; log-probabilities {apart.tolist()} apart, '
                        f'{packed.tolist()} packed). Set padding_free=false for this model.')
