"""The sequence-level KL estimate of evaluate.py is of KL(π_T‖π_ref): samples drawn at temperature T (renormalised over
top_p) are scored with the distribution they were drawn from. It is exactly 0 when the policy is its own reference
at T = 1, and positive at T ≠ 1 (π_T is not π); it equals (in expectation) the exact KL of short answers, computed by
enumerating every answer; and the distribution it scores is the one generate() sampled from (its own output_scores),
whatever the model's generation config says.

The toy pair: π is the short SFT run (conftest.short_sft_run), π_ref the embedded model it started from (random
weights); answers of at most 2 tokens (320 + 319 · 320 of them) on 3 synthetic test prompts.
"""
import copy

import pytest
import torch

from evaluate import add_kl
from generation import encode_prompts, generate, load_model, load_prompts, sample_rows, sampling_kwargs, sequence_logps

pytestmark = pytest.mark.slow  # the short SFT run (conftest.short_sft_run)

MAX_NEW_TOKENS = 2


@pytest.fixture(scope='module')
def models(short_sft_run, tmp_path_factory):
    """π: the short SFT run; π_ref: the embedded model it started from (random weights)."""
    cache = str(tmp_path_factory.mktemp('cache'))
    policy = load_model(str(short_sft_run), 'cpu', local_dirs=[cache])
    reference = load_model('embedded:tiny', 'cpu', local_dirs=[cache])
    prompts = load_prompts(['synthetic'], 'test', 3, policy.tokenizer, dataset_options={'synthetic': {'n_test': 64}})
    return policy, reference, prompts, encode_prompts(policy.tokenizer, prompts, 64)


@torch.no_grad()
def answer_logits(loaded, prompt_ids, stop_ids):
    """(logits of y1 | x over the vocabulary, logits of y2 | x, y1 for every y1 that does not stop, NaN rows for the
    others): every answer of at most 2 tokens, one unpadded forward pass per first token."""
    prompt = torch.tensor([prompt_ids])
    first = loaded.model(prompt).logits[0, -1].float()
    vocabulary = first.shape[0]
    continuing = torch.tensor([v for v in range(vocabulary) if v not in stop_ids])
    rows = torch.cat([prompt.expand(len(continuing), -1), continuing[:, None]], dim=1)
    second = torch.full((vocabulary, vocabulary), float('nan'))
    second[continuing] = loaded.model(rows).logits[:, -1].float()
    return first, second


def rule_logps(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """log π_T of the next token, written out here independently of transformers' warpers: the log-softmax of
    logits / T, restricted to the nucleus (the most probable tokens, each kept while the tokens more probable than
    it hold less than top_p) and renormalised there."""
    logps = (logits / temperature).log_softmax(-1)
    if top_p < 1:
        ordered, order = logps.sort(-1, descending=True)
        more_probable = ordered.exp().cumsum(-1) - ordered.exp()
        keep = torch.zeros_like(logps, dtype=torch.bool).scatter(-1, order, more_probable < top_p)
        logps = logps.masked_fill(~keep, float('-inf')).log_softmax(-1)
    return logps


def kl_terms(p: torch.Tensor, q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ exp(p)·(weight), the terms of tokens outside the support (exp(p) = 0) counted as 0."""
    return torch.where(p > float('-inf'), p.exp() * weight, torch.zeros_like(p)).sum(-1)


def exact_kls(policy_logits, reference_logits, stop_ids, temperature, top_p):
    """(KL(π_T‖π_ref), E_{y~π_T}[log π(y) − log π_ref(y)]) over the answers of at most 2 tokens: the first token's
    term plus, for each first token that does not stop, its probability times the second token's. The second is
    what scoring the samples with temperature-1 log-probabilities estimated (evaluate.py before this fix)."""
    (p1, p2), (r1, r2) = policy_logits, reference_logits
    t1, l1, q1 = rule_logps(p1, temperature, top_p), rule_logps(p1), rule_logps(r1)
    kl, old = kl_terms(t1, q1, t1 - q1), kl_terms(t1, q1, l1 - q1)
    for v in range(p1.shape[0]):
        if v not in stop_ids and t1[v] > float('-inf'):
            t2, l2, q2 = rule_logps(p2[v], temperature, top_p), rule_logps(p2[v]), rule_logps(r2[v])
            kl += t1[v].exp() * kl_terms(t2, q2, t2 - q2)
            old += t1[v].exp() * kl_terms(t2, q2, l2 - q2)
    return kl.item(), old.item()


def test_the_kl_is_zero_only_where_the_policy_is_its_reference(models):
    """The same model as policy and reference. At T = 1 every sample's log π_T − log π_ref is exactly 0 (the same
    computation twice). At T = 0.25 it is not: π_0.25 is not π, and 50 samples of each prompt (at most 2 tokens)
    estimate the exact KL(π_0.25‖π) within 4 standard errors (measured: exact 0.945 nats, estimate
    1.009 ± 0.091); each row's kl is logp_sampling − logp_reference, and logp_policy (log π) is logp_reference."""
    policy, _, prompts, ids = models
    samples = generate(policy, ids, n=4, temperature=1.0, max_new_tokens=6, seed=0, progress=False)
    rows = sample_rows(prompts, samples)
    assert add_kl(policy, policy, ids, samples, rows, batch_size=5) == {'mean': 0.0, 'stderr': 0.0}
    assert {r['kl'] for r in rows} == {0.0}

    samples = generate(policy, ids, n=50, temperature=0.25, max_new_tokens=MAX_NEW_TOKENS, seed=0, progress=False)
    rows = sample_rows(prompts, samples)
    estimate = add_kl(policy, policy, ids, samples, rows, batch_size=64, temperature=0.25)
    tables = [answer_logits(policy, p, policy.stop_ids) for p in ids]
    exact = sum(exact_kls(t, t, policy.stop_ids, 0.25, 1.0)[0] for t in tables) / len(tables)
    assert exact > 0.5 and abs(estimate['mean'] - exact) < 4 * estimate['stderr']
    for r in rows:
        assert r['logp_policy'] == r['logp_reference'] and r['kl'] == r['logp_sampling'] - r['logp_reference']


@pytest.mark.parametrize('temperature, top_p', [(1.0, 1.0), (0.25, 1.0), (0.7, 0.9)])
def test_per_sample_log_probabilities_are_the_exact_per_token_sums(models, temperature, top_p):
    """sequence_logps(T, top_p) of a batch of padded answers = log π_T(y1 | x) + log π_T(y2 | x, y1) read off the
    enumeration (rule_logps): 24 answers sampled at that rule (2 tokens each: this policy's answers are longer) and,
    at T = 1, for each prompt ' ' + EOS and EOS alone (the stop token counts: it was sampled like any other)."""
    policy, _, _, ids = models
    samples = generate(policy, ids, n=8, temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS, seed=1,
                       progress=False)
    space, eos = policy.tokenizer.convert_tokens_to_ids('Ġ'), policy.tokenizer.eos_token_id
    answers = [(s.prompt_index, s.completion_ids) for row in samples for s in row]
    if temperature == 1:
        answers += [(i, answer) for i in range(len(ids)) for answer in ([space, eos], [eos])]
    logps = sequence_logps(policy, [ids[i] for i, _ in answers], [a for _, a in answers], batch_size=7,
                           temperature=temperature, top_p=top_p)
    tables = [answer_logits(policy, p, policy.stop_ids) for p in ids]
    for (i, answer), logp in zip(answers, logps):
        first, second = tables[i]
        exact = rule_logps(first, temperature, top_p)[answer[0]]
        if len(answer) == 2:
            exact = exact + rule_logps(second[answer[0]], temperature, top_p)[answer[1]]
        assert logp == pytest.approx(exact.item(), abs=1e-4)


@pytest.mark.parametrize('temperature', [1.0, 0.25])
def test_the_sample_mean_estimates_the_exact_kl(models, temperature):
    """200 samples of each of 3 prompts at temperature T, answers of at most 2 tokens: the mean of log π_T − log π_ref
    is within 4 standard errors of the exact KL(π_T‖π_ref), Σ over all 320 + 319 · 320 answers of
    π_T(y) log π_T(y)/π_ref(y). Measured: at T = 1 exact 8.043, 7.525 and 7.520 nats (mean 7.696), estimate
    7.733 ± 0.057; at T = 0.25 exact 9.398, 9.785 and 9.830 (mean 9.671), estimate 9.739 ± 0.059, where the
    temperature-1 scoring of before estimated E_{π_T}[log π − log π_ref] = 8.725, 16 standard errors off (the
    difference is KL(π_T‖π) itself)."""
    policy, reference, prompts, ids = models
    exact, old = zip(*[exact_kls(answer_logits(policy, p, policy.stop_ids), answer_logits(reference, p, policy.stop_ids),
                                 policy.stop_ids, temperature, 1.0) for p in ids])
    samples = generate(policy, ids, n=200, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS, seed=2,
                       batch_size=3, progress=False)
    estimate = add_kl(policy, reference, ids, samples, sample_rows(prompts, samples), batch_size=256,
                      temperature=temperature)
    exact_mean, old_mean = sum(exact) / len(exact), sum(old) / len(old)
    assert abs(estimate['mean'] - exact_mean) < 4 * estimate['stderr']
    assert estimate['stderr'] < 0.02 * exact_mean  # a sharp test: 4 standard errors are within 8% of the truth
    if temperature != 1:
        assert abs(old_mean - exact_mean) > 10 * estimate['stderr']  # the temperature-1 scoring failed this test


@torch.no_grad()
def test_the_distribution_scored_is_the_one_generate_sampled_from(models):
    """The policy's generation config asks for top_k=3 and repetition_penalty=1.5, which generate() would apply on its
    own: with sampling_kwargs they are off, and the processed scores generate() sampled each token from
    (output_scores) give, summed up to the stop token, sequence_logps(T=0.7, top_p=0.9) of the same 12 samples to
    1e-4. The control: with the model's settings left on, the scores differ by more than 0.1 nats somewhere."""
    policy, _, _, ids = models
    model = policy.model
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.top_k, model.generation_config.repetition_penalty = 3, 1.5
    try:
        def sampled(**kwargs):
            torch.manual_seed(3)
            inputs = torch.tensor([ids[0]])
            out = model.generate(inputs, max_new_tokens=6, num_return_sequences=12, eos_token_id=policy.stop_ids,
                                 pad_token_id=policy.tokenizer.pad_token_id, output_scores=True,
                                 return_dict_in_generate=True, **kwargs)
            tokens = out.sequences[:, inputs.shape[1]:]
            steps = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(2, tokens[..., None])[..., 0]
            completions, totals = [], []
            for row, logps in zip(tokens.tolist(), steps):
                stop = next((t for t, token in enumerate(row) if token in policy.stop_ids), len(row) - 1)
                completions.append(row[:stop + 1])
                totals.append(logps[:stop + 1].sum().item())
            return completions, totals

        completions, from_generate = sampled(**sampling_kwargs(0.7, 0.9))
        scored = sequence_logps(policy, [ids[0]] * 12, completions, temperature=0.7, top_p=0.9)
        assert scored == pytest.approx(from_generate, abs=1e-4)
        completions, with_model_settings = sampled(do_sample=True, temperature=0.7, top_p=0.9)
        scored = sequence_logps(policy, [ids[0]] * 12, completions, temperature=0.7, top_p=0.9)
        assert max(abs(a - b) for a, b in zip(scored, with_model_settings)) > 0.1
    finally:
        model.generation_config = saved
