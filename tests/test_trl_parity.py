"""Parity with TRL's DPOTrainer (trl==1.16.0, requirements-dev.txt) on real data: the audit of issue 23, kept in the
suite. On one batch of 4 pairs of the real HH slice (GPT-NeoX-20B's tokenizer, a tiny random GPT-NeoX of its
vocabulary) and one of the UltraFeedback messages slice (SmolLM2's tokenizer and chat template, a tiny random Llama of
its vocabulary), policy and reference of different weights:

- HH tokenization is TRL's token for token; UltraFeedback's differs by design: TRL trains on the newline the template
  writes after `<|im_end|>`, our response ends at the end-of-turn token, where generation stops. And with a tokenizer
  that adds BOS, TRL's sequences start with it, ours (as the original's) do not.
- Given the same tokens, the chosen/rejected log-probabilities (whole LM head, and ours chunked), and the DPO
  (sigmoid), hinge and IPO losses and their gradients equal TRL's own functions (DPOTrainer.compute_ref_log_probs,
  DPOTrainer.compute_loss) within float32 rounding. IPO equals TRL's with loss.average_log_prob=true only: TRL divides
  each log-ratio by its completion's length, ours (as the original, and the IPO paper's sequence log-ratios) sums.

The loss function is losses.preference_loss, the registry's objectives behind the original's signature.
"""
import copy
import gzip
import json
import math

import pytest
import torch

from conftest import shared
from logps import concatenated_logps
from preference_datasets import get_batch_iterator
from losses import preference_loss

trl = pytest.importorskip('trl', reason='TRL is absent (pip install -r requirements-dev.txt installs trl==1.16.0)')
pytestmark = pytest.mark.slow  # about 6 minutes on 2 busy cores: 50k-token vocabularies over sequences of 650 tokens

BETA = 0.1
N_PAIRS = 4
LENGTHS = dict(max_length=1024, max_prompt_length=512)  # the first 4 pairs of each slice fit whole (at most 651 tokens)
LOSSES = {'sigmoid': False, 'hinge': False, 'ipo': True}  # loss type → loss.average_log_prob (IPO: TRL's length mean)
# config.yaml's logps_chunk_size, what training computes with (the whole head is compared in the log-prob test)
CHUNK = 2048
EPS = torch.finfo(torch.float32).eps


def tiny_pair(architecture, vocabulary):
    """(policy, reference) of one architecture, 1 layer of width 32, random weights of seeds 0 and 1."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
    config_class, model_class = {'gpt-neox': (GPTNeoXConfig, GPTNeoXForCausalLM),
                                 'llama': (LlamaConfig, LlamaForCausalLM)}[architecture]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(model_class(config_class(vocab_size=vocabulary, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               max_position_embeddings=2048)).float())
    return models


def first_batch(source, tokenizer, cache_dir):
    return next(get_batch_iterator([source], tokenizer, split='test', batch_size=N_PAIRS, shuffle=False, n_epochs=1,
                                   silent=True, cache_dir=str(cache_dir), **LENGTHS))


@pytest.fixture(scope='module')
def hh(hh_slice_dir, neox_tokenizer, tmp_path_factory):
    """The HH case: (tokenizer, batch, TRL's rows of the same pairs, policy, reference)."""
    batch = first_batch(f'hh:{hh_slice_dir}', neox_tokenizer, tmp_path_factory.mktemp('hh_cache'))
    rows = [{'prompt': p, 'chosen': c, 'rejected': r}
            for p, c, r in zip(batch['prompt'], batch['chosen_response_only'], batch['rejected_response_only'])]
    return neox_tokenizer, batch, rows, *tiny_pair('gpt-neox', len(neox_tokenizer))


@pytest.fixture(scope='module')
def ultrafeedback(ultrafeedback_messages, smollm2_gguf, tmp_path_factory):
    """The UltraFeedback case: SmolLM2's tokenizer read from its GGUF file, the batch, the slice's own message lists of
    the same pairs (TRL's implicit-prompt conversational form), policy, reference."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    batch = first_batch(str(ultrafeedback_messages), tokenizer, tmp_path_factory.mktemp('uf_cache'))
    with gzip.open(shared('ultrafeedback', 'test.messages.jsonl.gz'), 'rt') as f:
        slice_rows = [json.loads(line) for line in f]
    rows = []
    for prompt, chosen in zip(batch['prompt'], batch['chosen_response_only']):
        row = next(r for r in slice_rows if r['chosen'][0]['content'] in prompt and r['chosen'][-1]['content'] in chosen)
        rows.append({'chosen': row['chosen'], 'rejected': row['rejected']})
    return tokenizer, batch, rows, *tiny_pair('llama', len(tokenizer))


def trl_trainer(tokenizer, rows, policy, reference, loss_type='sigmoid', tmp_path=None):
    """TRL's DPOTrainer on copies of the models and `rows`, in float32 on the CPU, dropout off as ours."""
    from datasets import Dataset
    config = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=N_PAIRS, beta=BETA,
                           loss_type=loss_type, max_length=None, report_to=[], use_cpu=True, bf16=False, fp16=False,
                           dataloader_num_workers=0, save_strategy='no', disable_dropout=True,
                           gradient_checkpointing=False)
    return trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def ours_tokens(batch, kind):
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch[f'{kind}_input_ids'], batch[f'{kind}_attention_mask'])]


def trl_tokens(trainer, kind):
    return [ex['prompt_ids'] + ex[f'{kind}_ids'] for ex in trainer.train_dataset]


def trl_inputs(batch):
    """Our batch in TRL's collated form: chosen rows then rejected rows, right-padded, completion_mask = our labels."""
    from logps import concatenated_inputs
    concatenated = concatenated_inputs(batch)
    return {'input_ids': concatenated['concatenated_input_ids'],
            'attention_mask': concatenated['concatenated_attention_mask'],
            'completion_mask': (concatenated['concatenated_labels'] != -100).long()}


CASES = ['hh', 'ultrafeedback']


def test_hh_tokens_are_trls_and_a_bos_is_trls_alone(hh, tmp_path):
    """The 4 HH pairs (234, 234, 163 and 308 tokens chosen): TRL's prompt + response ids are ours, EOS at the end
    included (the original appends it; TRL adds eos_token to non-conversational responses). With add_bos_token=True
    TRL's tokenizer call puts BOS (<|endoftext|>, id 0) first; ours never adds BOS (as the original)."""
    from transformers import AutoTokenizer
    tokenizer, batch, rows, policy, reference = hh
    trainer = trl_trainer(tokenizer, rows, policy, reference, tmp_path=tmp_path)
    for kind in ('chosen', 'rejected'):
        assert trl_tokens(trainer, kind) == ours_tokens(batch, kind)
    assert [len(t) for t in ours_tokens(batch, 'chosen')] == [234, 234, 163, 308]
    assert all(t[-1] == tokenizer.eos_token_id for t in ours_tokens(batch, 'chosen'))
    with_bos = AutoTokenizer.from_pretrained(str(shared('tokenizers', 'gpt-neox-20b')), add_bos_token=True)
    trainer = trl_trainer(with_bos, rows, policy, reference, tmp_path=tmp_path / 'bos')
    assert trl_tokens(trainer, 'chosen') == [[with_bos.bos_token_id] + t for t in ours_tokens(batch, 'chosen')]


def test_ultrafeedback_tokens_are_trls_but_for_the_newline_after_im_end(ultrafeedback, tmp_path):
    """SmolLM2's template renders a turn as '...<|im_end|>\\n'. Our responses end at <|im_end|> (its end-of-turn, also
    its EOS: where generation stops); TRL's go on with the '\\n' after it. Everything before is the same tokens
    (system prompt, user turn, generation prompt, response)."""
    tokenizer, batch, rows, policy, reference = ultrafeedback
    trainer = trl_trainer(tokenizer, rows, policy, reference, tmp_path=tmp_path)
    im_end, newline = tokenizer.convert_tokens_to_ids('<|im_end|>'), tokenizer('\n', add_special_tokens=False)['input_ids']
    for kind in ('chosen', 'rejected'):
        ours = ours_tokens(batch, kind)
        assert all(t[-1] == im_end for t in ours)
        assert trl_tokens(trainer, kind) == [t + newline for t in ours]


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('chunk_size', [None, 64], ids=['whole-head', 'chunked'])
def test_log_probabilities_equal_trls(case, chunk_size, request, tmp_path):
    """log π(y|x) of the chosen and rejected responses, summed over their tokens, on the same tokens: ours (the LM head
    whole, or 64 labelled positions at a time) and TRL's compute_ref_log_probs, for policy and reference, to 1e-6
    relative (measured: about 1e-7)."""
    tokenizer, batch, rows, policy, reference = request.getfixturevalue(case)
    trainer = trl_trainer(tokenizer, rows, policy, reference, tmp_path=tmp_path)
    inputs = trl_inputs(batch)
    for ours_model, trl_model in ((policy, trainer.model), (reference, trainer.ref_model)):
        with torch.no_grad():
            ours = concatenated_logps(ours_model.eval(), batch, chunk_size)
        theirs = trainer.compute_ref_log_probs(trl_model, inputs)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def ours_loss_and_gradients(policy, reference, batch, loss_type, average_log_prob):
    """The project's loss (the mean over pairs of preference_loss), the policy's gradients after its backward, and the
    float32 resolution of the loss: |∂ℓ/∂h| times that of the margins h, ε·log2(n)·Σ|log π| for the largest pair's four
    log-probabilities, sums over up to n tokens."""
    policy = copy.deepcopy(policy).train()
    with torch.no_grad():
        reference_logps = concatenated_logps(reference.eval(), batch, CHUNK, average_log_prob)
    policy_logps = concatenated_logps(policy, batch, CHUNK, average_log_prob)
    losses, _, _ = preference_loss(*policy_logps, *reference_logps, beta=BETA, loss_type=loss_type)
    loss = losses.mean()
    loss.backward()
    # a float32 sum of n terms (summed pairwise) is accurate to about ε·log2(n)·Σ|terms|
    width = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
    resolution = EPS * math.log2(width) * sum(t.detach().abs() for t in (*policy_logps, *reference_logps)).max().item()
    margins = (policy_logps[0] - policy_logps[1] - reference_logps[0] + reference_logps[1]).detach()
    # |∂ℓ/∂h|: β for the sigmoid and the hinge, 2·|h − 1/(2β)| for IPO
    slope = 2 * (margins - 1 / (2 * BETA)).abs().max().item() if loss_type == 'ipo' else BETA
    return loss.detach(), {name: p.grad for name, p in policy.named_parameters()}, slope * resolution


def trl_loss_and_gradients(trainer, inputs):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('loss_type', sorted(LOSSES))
def test_losses_and_gradients_equal_trls(case, loss_type, request, tmp_path):
    """DPO (sigmoid), hinge and IPO (ours with loss.average_log_prob=true) with β = 0.1, policy and reference of other
    weights, on the same tokens: the loss and every parameter's gradient equal TRL's compute_loss and its backward
    within float32 rounding. Summed log-probabilities reach 5,000 nats here over up to 651 tokens, so a margin h (a
    difference of four such sums) is resolved to about δ = ε·log2(651)·Σ|log π| ≈ 3e-2 nats on UltraFeedback and a loss
    to |∂ℓ/∂h|·δ (β·δ for the sigmoid and the hinge; IPO's per-token means are resolved to δ ≈ 5e-5, its slope
    2·|h − 1/(2β)| is about 10): the loss must agree to that (or 1e-6 relative), each gradient to max(that, 1e-5) of
    its largest entry. Measured (logps_chunk_size=2048, as training): losses 7.2e-5 relative apart at most
    (UltraFeedback, hinge; IPO 1.3e-6), gradients 3.6e-4 of their largest entry at most (UltraFeedback, sigmoid; the
    bound is 3.4e-3 there), hinge and IPO about 1e-6; with the whole head, as the original computes, 1.7e-5 and
    5.6e-5."""
    tokenizer, batch, rows, policy, reference = request.getfixturevalue(case)
    trainer = trl_trainer(tokenizer, rows, policy, reference, loss_type, tmp_path)
    ours_loss, ours_grads, tolerance = ours_loss_and_gradients(policy, reference, batch, loss_type, LOSSES[loss_type])
    trl_loss, trl_grads = trl_loss_and_gradients(trainer, trl_inputs(batch))
    assert abs(ours_loss.item() - trl_loss.item()) <= max(tolerance, 1e-6 * abs(trl_loss.item()))
    assert ours_grads.keys() == trl_grads.keys()
    for name, grad in ours_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grad, trl_grads[name], rtol=0, atol=max(tolerance, 1e-5) * scale, msg=name)


@pytest.mark.parametrize('case', CASES)
def test_ipo_on_summed_log_ratios_is_not_trls(case, request, tmp_path):
    """IPO on summed log-ratios (ours by default, loss.average_log_prob=false, as the original) is another objective
    than TRL's, which divides each log-ratio by its completion's length: on these pairs of 9 to 533 response tokens
    the two losses differ by more than 1%."""
    tokenizer, batch, rows, policy, reference = request.getfixturevalue(case)
    trainer = trl_trainer(tokenizer, rows, policy, reference, 'ipo', tmp_path)
    summed, _, _ = ours_loss_and_gradients(policy, reference, batch, 'ipo', average_log_prob=False)
    theirs, _ = trl_loss_and_gradients(trainer, trl_inputs(batch))
    assert abs(summed.item() - theirs.item()) > 0.01 * theirs.item()
