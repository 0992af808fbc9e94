"""Judges and reward models read the dialogue, not the policy's chat markup, and a judge prompt over its limit keeps
its instructions (issue 23, bug 2): SmolLM2 as the local judge on rendered UltraFeedback prompts, a tiny reward model
on the real HH slice plain and chat-rendered."""
import re
import warnings

import pytest
import torch

import chat_format

import data_sources as ds
import judges
from conftest import CHAT_TEMPLATE
from eval_helpers import save_reward_model
from generation import Prompt, load_prompts
from utils import UserError

INSTRUCTIONS = 'For the following query to a chatbot, which response is more helpful?\n\nQuery: '
FORMAT_LINE = 'Comparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">'
IM_START = 1  # SmolLM2's <|im_start|>


@pytest.fixture(scope='module')
def smollm2_judge(smollm2_local_dirs):
    """judge=llm:PATH with SmolLM2-135M-Instruct (its default limit of 2,048 prompt tokens)."""
    return judges.make_judge(f'llm:{smollm2_local_dirs[1]}', device='cpu')


@pytest.fixture(scope='module')
def uf_prompts(smollm2_tokenizer, ultrafeedback_messages):
    """The first 8 UltraFeedback test prompts, rendered with SmolLM2's template as evaluate.py renders them."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        return load_prompts([str(ultrafeedback_messages)], 'test', 8, smollm2_tokenizer)


def test_the_local_judge_reads_the_dialogue_in_its_own_template(smollm2_judge, uf_prompts):
    """A rendered prompt is '<|im_start|>system ...<|im_end|>\\n<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\n'.
    Before, that text was the judge's query, its control tokens parsed: 6 <|im_start|> in the judge's prompt, the
    judge's user turn closed after 'Query: ' and a turn of the policy's template opened inside it. Now the query is
    'Human: Q', and each of the 16 judge prompts (8 pairs, both orders) holds exactly the 3 <|im_start|> and 2
    <|im_end|> a clean one-message prompt has (SmolLM2's template writes its default system turn), and Q itself."""
    tokenizer = smollm2_judge.loaded.tokenizer
    clean = tokenizer(tokenizer.apply_chat_template([{'role': 'user', 'content': 'Which is better?'}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)['input_ids']
    assert clean.count(IM_START) == 3 and all(p.text.count('<|im_start|>') == 3 for p in uf_prompts)
    queries = smollm2_judge.queries(uf_prompts, ['Sure.'] * 8, ['No.'] * 8)
    assert [q.query for q in queries[::2]] == [('\n\nHuman: ' + p.dialogue[-1]['content']).strip() for p in uf_prompts]
    for query, ids in zip(queries, smollm2_judge.prompt_ids(queries)):
        assert ids.count(IM_START) == 3 and ids.count(tokenizer.eos_token_id) == 2  # <|im_end|> = EOS = 2
        text = tokenizer.decode(ids)
        assert query.query in text and text.endswith(FORMAT_LINE + '<|im_end|>\n<|im_start|>assistant\n')


def test_an_over_long_query_keeps_the_instructions(smollm2_judge, uf_prompts):
    """The longest of the 8 prompts (a query of 293 tokens) against a response of 2,001 tokens, within 300 tokens:
    the judge's template, the instructions and the verdict format line (137 tokens with an empty query and
    responses) stay whole; the query keeps its end and response A its start, each marked '[...]'; response B
    ('Short.') stays whole. Within 100 tokens, less than the instructions: a UserError. Before, the last 300
    tokens were kept, so the prompt started inside the query, with neither the system turn nor the instructions."""
    tokenizer = smollm2_judge.loaded.tokenizer
    longest = max(uf_prompts, key=lambda p: len(p.text))
    query = judges.JudgeQuery(judges.dialogue_query(longest), 'A long answer. ' * 500, 'Short.')
    ids = judges.judge_prompt_ids(tokenizer, query, 300)
    text = tokenizer.decode(ids)
    before = tokenizer.apply_chat_template([{'role': 'user', 'content': 'X'}], tokenize=False, add_generation_prompt=True)
    assert len(ids) == 300 and ids.count(IM_START) == 3
    assert text.startswith(before[:before.index('X')] + INSTRUCTIONS + '[...] ')
    assert query.query[-40:] + '\n\nResponse A:\nA long answer. A long answer.' in text
    assert re.search(r'\nResponse A:\nA long answer\.[^\n]* \[\.\.\.\]\n\nResponse B:\nShort\.\n\nFIRST provide', text)
    assert text.endswith(FORMAT_LINE + before[before.index('X') + 1:])
    smollm2_judge.max_prompt_length = 300
    try:
        assert smollm2_judge.prompt_ids([query]) == [ids]
    finally:
        smollm2_judge.max_prompt_length = 2048
    with pytest.raises(UserError, match=r"the judge's prompt limit of 100 tokens is shorter than its instructions"):
        judges.judge_prompt_ids(tokenizer, query, 100)


def test_fair_shares_worked_values():
    """Lengths 10, 50, 200 in 100 tokens: the cap 45 (10 + 45 + 45 = 100); in 101: 45 and a spare token to the first
    part over the cap, 10, 46, 45; all fit in 260; nothing in 0."""
    assert judges._fair_shares([10, 50, 200], 100) == [10, 45, 45]
    assert judges._fair_shares([10, 50, 200], 101) == [10, 46, 45]
    assert judges._fair_shares([10, 50, 200], 260) == [10, 50, 200]
    assert judges._fair_shares([10, 50, 200], 0) == [0, 0, 0]


def hh_prompts_both_ways(hh_slice_dir, smollm2_tokenizer, n=40):
    """(plain HH Prompt, the same dialogue's SmolLM2-rendered Prompt) of the real HH slice's first prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        plain = load_prompts([f'hh:{hh_slice_dir}'], 'test', n, None)
        chat = load_prompts([f'hh:{hh_slice_dir}'], 'test', n, smollm2_tokenizer, None,
                            {'render_hh_with_chat_template': True})
    by_dialogue = {str(p.dialogue): p for p in chat}
    return [(p, by_dialogue[str(p.dialogue)]) for p in plain if str(p.dialogue) in by_dialogue]


def test_a_reward_model_scores_a_rendered_prompt_as_its_plain_dialogue(tmp_path, hh_slice_dir, smollm2_tokenizer):
    """reward:PATH, a tiny GPT-NeoX classifier with a byte tokenizer and no chat template, on the real HH slice's
    first 40 prompts, plain and rendered with SmolLM2's template (render_hh_with_chat_template). Each plain prompt
    with its chosen response (' ' + text, as HH writes it) scores exactly what the rendered prompt of the same
    dialogue scores with the response as a chat policy writes it (no leading space): the scorer reads both as
    '\\n\\nHuman: ...\\n\\nAssistant: text'. Before, it read the rendered prompt's markup, and the scores differed."""
    judge = judges.make_judge(f'reward:{save_reward_model(tmp_path / "rm")}', batch_size=4, device='cpu')
    pairs = hh_prompts_both_ways(hh_slice_dir, smollm2_tokenizer)
    assert len(pairs) >= 30 and all(c.chat_rendered and c.text.startswith('<|im_start|>system') for _, c in pairs)
    responses = [p.chosen.strip() for p, _ in pairs]
    plain = judge.score([p for p, _ in pairs], [' ' + r for r in responses])
    rendered = judge.score([c for _, c in pairs], responses)
    assert rendered == pytest.approx(plain, abs=1e-5)
    assert judge.texts([pairs[0][1]], [responses[0]]) == [pairs[0][0].text + ' ' + responses[0]]
    markup = judge.score([c.text for _, c in pairs], responses)  # the rendered text read as HH text: the old input
    assert max(abs(a - b) for a, b in zip(markup, plain)) > 1e-3


def test_a_reward_model_with_a_chat_template_reads_the_dialogue_through_it(tmp_path, hh_slice_dir, smollm2_tokenizer):
    """The same classifier with the role-per-line chat template saved with it: a plain HH prompt and the
    SmolLM2-rendered prompt of the same dialogue both reach it as that template's rendering of the dialogue and the
    response ('user: ...\\nassistant: text<|endoftext|>\\n'), and score the model's logit on those tokens."""
    path = save_reward_model(tmp_path / 'rm_chat')
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    judge = judges.make_judge(f'reward:{path}', device='cpu')
    plain, chat = hh_prompts_both_ways(hh_slice_dir, smollm2_tokenizer, n=8)[1]
    response = plain.chosen.strip()
    expected = tokenizer.apply_chat_template(plain.dialogue + [{'role': 'assistant', 'content': response}], tokenize=False)
    assert expected.startswith('user: ') and expected.endswith(f'assistant: {response}<|endoftext|>\n')
    assert judge.texts([plain], [' ' + response]) == judge.texts([chat], [response]) == [expected]
    with torch.no_grad():
        ids = tokenizer(expected, add_special_tokens=False, return_tensors='pt')
        logit = judge.model(**ids).logits[0, 0].item()
    assert judge.score([plain, chat], [' ' + response, response]) == pytest.approx([logit, logit], abs=1e-5)


def test_a_prompt_remembers_its_dialogue(smollm2_tokenizer, uf_prompts):
    """load_prompts keeps each rendered prompt's messages; an HH-format Prompt reads them from its text, and its
    plain text is the text itself."""
    assert all(p.chat_rendered and p.messages == p.dialogue and p.dialogue[-1]['role'] == 'user' for p in uf_prompts)
    assert uf_prompts[0].plain_text == '\n\nHuman: ' + uf_prompts[0].dialogue[0]['content'] + '\n\nAssistant:'
    hh = Prompt('\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:', ' Bye!', 'hh')
    assert hh.dialogue == [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'},
                           {'role': 'user', 'content': 'Bye'}]
    assert hh.plain_text == hh.text == chat_format.hh_text(hh.dialogue)
