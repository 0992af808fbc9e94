"""The judges (judges.py): known scores of the scorers, the paper's verdict format, the order swap that cancels a
judge's position bias, and the messages for judges that cannot be used."""
import pytest
import torch

from eval_helpers import save_letter_judge, save_reward_model
from judges import (DIALOGUE_PROMPT, JudgeQuery, comparison, dialogue_query, judge_problems, make_judge, parse_verdict)
from synthetic_task import synthetic_prompt

HH_PROMPT = '\n\nHuman: How do I boil an egg?\n\nAssistant:'


@pytest.fixture(scope='module')
def letter_judges(tmp_path_factory):
    """llm: judges that answer 'A' (and 'B') to every prompt: real GPT-NeoX models (tests/judge_models.py)."""
    root = tmp_path_factory.mktemp('judges')
    return {letter: make_judge(f'llm:{save_letter_judge(root / letter, letter, root / "cache")}')
            for letter in 'AB'}


def test_vader_sentiment_worked_numbers():
    """VADER's compound score is x / √(x² + 15) of the summed lexicon valences x (Hutto & Gilbert 2014):
    'good' 1.9 → 0.4404, 'bad' −2.5 → −0.5423, 'good and happy' 1.9 + 2.7 = 4.6 → 0.7650, 'The table.' 0;
    the mean of the four is 0.6631 / 4 = 0.165775."""
    judge = make_judge('sentiment')
    scores = judge.score([HH_PROMPT] * 4, ['good', 'bad', 'good and happy', 'The table.'])
    assert scores == [0.4404, -0.5423, 0.765, 0.0]
    assert sum(scores) / 4 == pytest.approx(0.165775)
    assert not judge.pairwise


def test_gold_scores_exact_answers():
    """'reverse cab' → 'bac': ' bac' and 'bac \\n' are right, ' ba' and 'BAC' wrong: mean 0.5."""
    judge = make_judge('gold')
    prompt = synthetic_prompt('reverse', 'cab')
    assert judge.score([prompt] * 4, [' bac', 'bac \n', ' ba', 'BAC']) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"judge=gold scores the synthetic task only .*'\\n\\nHuman: How do I boil"):
        judge.check_prompts([prompt, HH_PROMPT])


def test_reward_model_scores_are_its_logits_whatever_the_batch(tmp_path):
    """reward:PATH scores prompt + response with the model's one output; batched (right padding, texts of 5 to 40
    bytes) it gives each text's own logit, computed alone without padding."""
    path = save_reward_model(tmp_path / 'rm')
    judge = make_judge(f'reward:{path}', batch_size=3)
    responses = [' Boil it.', ' Put the egg in boiling water for nine minutes, then cool it.', ' No.', ' Ask a chef.']
    scores = judge.score([HH_PROMPT] * 4, responses)
    for response, score in zip(responses, scores):
        ids = judge.tokenizer(HH_PROMPT + response, return_tensors='pt')
        with torch.no_grad():
            assert score == pytest.approx(judge.model(**ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(scores)) == 4


def test_a_two_label_classifier_scores_the_log_odds_of_label_1(tmp_path):
    path = save_reward_model(tmp_path / 'rm2', num_labels=2)
    judge = make_judge(f'reward:{path}')
    ids = judge.tokenizer(HH_PROMPT + ' Boil it.', return_tensors='pt')
    with torch.no_grad():
        logits = judge.model(**ids).logits[0]
    assert judge.score([HH_PROMPT], [' Boil it.'])[0] == pytest.approx((logits[1] - logits[0]).item(), abs=1e-5)


def test_verdicts_in_the_papers_format():
    assert parse_verdict('Comparison: B explains more.\nMore helpful: B') == 'B'
    assert parse_verdict('Comparison: ...\nMore helpful: "A"') == 'A'
    assert parse_verdict('more helpful: <A>') == 'A'
    assert parse_verdict(' "B".') == 'B'
    assert parse_verdict('A: I do not know.\n\nB: I do not know.\n\nB') is None  # SmolLM2-135M's ramble, cut off
    assert parse_verdict('Both are fine.') is None
    assert parse_verdict('') is None


def test_the_order_swap_cancels_position_bias():
    """Response as A, then as B. Wins both: 1; loses both: 0; 'A' both times (position bias): (1 + 0) / 2 = ½;
    one unreadable verdict is a tie for that order: (1 + ½) / 2 = ¾."""
    assert comparison('A', 'B').score == 1.0
    assert comparison('B', 'A').score == 0.0
    assert comparison('A', 'A').score == 0.5
    assert comparison('B', 'B').score == 0.5
    assert comparison('A', None).score == 0.75
    assert comparison(None, None).score == 0.5


@pytest.mark.slow
def test_a_judge_that_always_answers_a_gives_one_half(letter_judges):
    """A real chat model whose answer is always 'A' (and one always 'B'): every pair scores ½, whichever response is
    better, because each pair is judged in both orders."""
    prompts = [HH_PROMPT, '\n\nHuman: Hi\n\nAssistant:', HH_PROMPT]
    responses = [' Boil it for nine minutes.', ' Hello! How can I help?', ' No.']
    references = [' No.', ' Go away.', ' Boil it for nine minutes.']
    for letter, judge in letter_judges.items():
        assert judge.verdict_texts([JudgeQuery('anything', '', ''), JudgeQuery('q', 'x', 'y')]) == [letter, letter]
        comparisons = judge.compare(prompts, responses, references)
        assert [(c.verdict_response_first, c.verdict_response_second, c.score) for c in comparisons] == \
            [(letter, letter, 0.5)] * 3


def test_the_judge_sees_the_query_and_both_responses():
    """The paper's dialogue prompt with the HH prompt's dialogue (no trailing 'Assistant:') as the query."""
    assert dialogue_query(HH_PROMPT) == 'Human: How do I boil an egg?'
    text = DIALOGUE_PROMPT.format(query=dialogue_query(HH_PROMPT), a='Boil it.', b='No.')
    assert text.startswith('For the following query to a chatbot, which response is more helpful?\n\nQuery: Human: How')
    assert '\n\nResponse A:\nBoil it.\n\nResponse B:\nNo.\n\n' in text
    assert text.endswith('Comparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">')


def test_unusable_judges_are_named(tmp_path):
    (tmp_path / 'causal').mkdir()
    (tmp_path / 'causal' / 'config.json').write_text('{"architectures": ["GPTNeoXForCausalLM"]}')
    assert judge_problems('gpt4') == ["judge='gpt4' is unknown; use gold, sentiment, reward:PATH, llm:PATH or api:MODEL"]
    assert judge_problems('llm:') == ['judge=llm:: give the path after the colon, e.g. llm:/path/to/model']
    assert judge_problems('sentiment:vader') == ['judge=sentiment:vader: sentiment takes no argument (judge=sentiment)']
    assert judge_problems(f'reward:{tmp_path}') == [f'judge=reward:{tmp_path}: {tmp_path} is not a Hugging Face model '
                                                     f'directory (no config.json)']
    assert judge_problems(f'reward:{tmp_path / "causal"}') == [
        f'judge=reward:{tmp_path / "causal"}: {tmp_path / "causal"} is a GPTNeoXForCausalLM, not a sequence-'
        f'classification reward model (…ForSequenceClassification)']
    assert judge_problems(f'llm:{tmp_path / "none"}')[0].startswith(
        f'judge=llm:{tmp_path / "none"}: {tmp_path / "none"}: no such directory, and not a Hub id')
    with pytest.raises(ValueError, match="judge='gpt4' is unknown"):
        make_judge('gpt4')


def test_the_api_judge_needs_a_key_and_a_reachable_endpoint(monkeypatch):
    """Nothing listens on port 9 (discard) of this machine: the judge says so before anything is generated."""
    monkeypatch.delenv('OPENAI_API_KEY', raising=False)
    with pytest.raises(ValueError, match='judge=api:gpt-4: set OPENAI_API_KEY in the environment'):
        make_judge('api:gpt-4')
    monkeypatch.setenv('OPENAI_API_KEY', 'none')
    monkeypatch.setenv('OPENAI_BASE_URL', 'http://127.0.0.1:9/v1')
    with pytest.raises(ValueError, match=r'judge=api:gpt-4: cannot reach the endpoint http://127.0.0.1:9/v1'):
        make_judge('api:gpt-4')
