"""The sequence-level KL(π‖π_ref) estimate of evaluate.py: exactly 0 when the policy is its reference, and equal (in
expectation) to the exact KL of short answers, computed by enumerating every answer."""
import pytest
import torch

from evaluate import add_kl
from generation import encode_prompts, generate, load_model, load_prompts, sample_rows, sequence_logps

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
def answer_logps(loaded, prompt_ids, stop_ids):
    """(log π(y1 | x) over the vocabulary, log π(y2 | x, y1) for every y1 that does not stop): every answer of at
    most 2 tokens, one unpadded forward pass per first token."""
    prompt = torch.tensor([prompt_ids])
    first = loaded.model(prompt).logits[0, -1].float().log_softmax(-1)
    vocabulary = first.shape[0]
    continuing = torch.tensor([v for v in range(vocabulary) if v not in stop_ids])
    rows = torch.cat([prompt.expand(len(continuing), -1), continuing[:, None]], dim=1)
    second = torch.full((vocabulary, vocabulary), float('nan'))
    second[continuing] = loaded.model(rows).logits[:, -1].float().log_softmax(-1)
    return first, second


def exact_kl(policy_logps, reference_logps, stop_ids) -> float:
    """Σ_y π(y) log π(y)/π_ref(y) over the answers of at most 2 tokens: the first token's KL plus, for each first
    token that does not stop, its probability times the KL of the second token."""
    (p1, p2), (r1, r2) = policy_logps, reference_logps
    kl = (p1.exp() * (p1 - r1)).sum()
    for v in range(p1.shape[0]):
        if v not in stop_ids:
            kl += p1[v].exp() * (p2[v].exp() * (p2[v] - r2[v])).sum()
    return kl.item()


def test_kl_is_zero_for_a_policy_equal_to_its_reference(models):
    """The same model as policy and reference: every sample's log π − log π_ref is exactly 0."""
    policy, _, prompts, ids = models
    samples = generate(policy, ids, n=4, temperature=1.0, max_new_tokens=6, seed=0, progress=False)
    rows = sample_rows(prompts, samples)
    assert add_kl(policy, policy, ids, samples, rows, batch_size=5) == {'mean': 0.0, 'stderr': 0.0}
    assert {r['kl'] for r in rows} == {0.0}


def test_per_sample_log_probabilities_are_the_exact_per_token_sums(models):
    """sequence_logps of a batch of padded answers = log π(y1 | x) + log π(y2 | x, y1) read off the enumeration: 24
    sampled answers (2 tokens each: this policy's answers are longer) and, for each prompt, ' ' + EOS and EOS alone
    (the stop token counts: it was sampled like any other)."""
    policy, _, _, ids = models
    samples = generate(policy, ids, n=8, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=1, progress=False)
    space, eos = policy.tokenizer.convert_tokens_to_ids('Ġ'), policy.tokenizer.eos_token_id
    answers = [(s.prompt_index, s.completion_ids) for row in samples for s in row]
    answers += [(i, answer) for i in range(len(ids)) for answer in ([space, eos], [eos])]
    logps = sequence_logps(policy, [ids[i] for i, _ in answers], [a for _, a in answers], batch_size=7)
    tables = [answer_logps(policy, p, policy.stop_ids) for p in ids]
    for (i, answer), logp in zip(answers, logps):
        first, second = tables[i]
        exact = first[answer[0]] + (second[answer[0], answer[1]] if len(answer) == 2 else 0)
        assert logp == pytest.approx(exact.item(), abs=1e-4)


def test_the_sample_mean_estimates_the_exact_kl(models):
    """200 samples of each of 3 prompts at temperature 1, answers of at most 2 tokens: the mean of log π − log π_ref
    is within 4 standard errors of the exact KL, Σ over all 320 + 319 · 320 answers of π(y) log π(y)/π_ref(y).
    Measured: exact 8.043, 7.525 and 7.520 nats (mean 7.696), estimate 7.733 ± 0.057 (0.65 standard errors off)."""
    policy, reference, prompts, ids = models
    exact = [exact_kl(answer_logps(policy, p, policy.stop_ids), answer_logps(reference, p, policy.stop_ids),
                      policy.stop_ids) for p in ids]
    samples = generate(policy, ids, n=200, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=2, batch_size=3,
                       progress=False)
    estimate = add_kl(policy, reference, ids, samples, sample_rows(prompts, samples), batch_size=256)
    exact_mean = sum(exact) / len(exact)
    assert abs(estimate['mean'] - exact_mean) < 4 * estimate['stderr']
    assert estimate['stderr'] < 0.02 * exact_mean  # a sharp test: 4 standard errors are within 8% of the truth
