"""A too long chat prompt is cut inside its conversation and rendered again, so it keeps the template's generation
prompt and the response follows it (issue 23, bug 1): worked values with a byte-level tokenizer, then the real
SmolLM2 tokenizer on the real UltraFeedback messages and HH slices."""
import copy
import warnings

import numpy as np
import pytest

import data_sources as ds
import preference_datasets as pd
from conftest import CHAT_TEMPLATE
from utils import UserError

GENERATION_PROMPT = [1, 520, 9531, 198]  # SmolLM2's '<|im_start|>assistant\n'
SMOLLM2_SYSTEM = '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'


@pytest.fixture
def chat_bytes(byte_tokenizer):
    """The byte tokenizer (one token per byte, <|endoftext|> one token) with the role-per-line template."""
    tokenizer = copy.deepcopy(byte_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def user(text):
    return {'role': 'user', 'content': text}


def assistant(text):
    return {'role': 'assistant', 'content': text}


def test_oldest_turns_go_then_the_middle_of_the_longest_message(chat_bytes):
    """[user 'aaaa', assistant 'bb', user 'abcdefghijklmnopqrst'] renders as 'user: aaaa\\n' (11 tokens) +
    'assistant: bb<|endoftext|>\\n' (15) + 'user: abc...t\\n' (27) + 'assistant:' (10) = 63 tokens.
    Within 63: as rendered. Within 40: the first exchange goes, 27 + 10 = 37. Within 30: 37 − 30 = 7 tokens too
    many, plus 7 for ' [...] ': the last message keeps 20 − 14 = 6 of its tokens, 'abc [...] rst', 6 + 13 + 1 + 10
    = 30. Within 17: every message emptied, 'user: \\nassistant:' = 17. Within 16: nothing fits, a UserError."""
    messages = [user('aaaa'), assistant('bb'), user('abcdefghijklmnopqrst')]
    rendered = lambda ids: chat_bytes.decode(ids)
    full = pd.chat_prompt_ids(chat_bytes, messages, 63)
    assert len(full) == 63 and rendered(full) == chat_bytes.apply_chat_template(messages, tokenize=False,
                                                                                  add_generation_prompt=True)
    assert rendered(pd.chat_prompt_ids(chat_bytes, messages, 40)) == 'user: abcdefghijklmnopqrst\nassistant:'
    assert rendered(pd.chat_prompt_ids(chat_bytes, messages, 30)) == 'user: abc [...] rst\nassistant:'
    assert rendered(pd.chat_prompt_ids(chat_bytes, messages, 17)) == 'user: \nassistant:'
    with pytest.raises(UserError, match=r"max_prompt_length=16 is shorter than the chat template's own text "
                                        r"\(17 tokens with every message emptied\)"):
        pd.chat_prompt_ids(chat_bytes, messages, 16)
    assert messages[2]['content'] == 'abcdefghijklmnopqrst'  # the caller's messages are left as they were


def test_a_system_message_stays(chat_bytes):
    """With 'system: be brief\\n' (17 tokens) first: 17 + 63 = 80 tokens. Within 50 the first exchange goes
    (17 + 37 = 54), then the last message keeps 20 − (4 + 7) = 9 tokens, 'abcde [...] qrst': 17 + 23 + 10 = 50."""
    messages = [{'role': 'system', 'content': 'be brief'}, user('aaaa'), assistant('bb'), user('abcdefghijklmnopqrst')]
    ids = pd.chat_prompt_ids(chat_bytes, messages, 50)
    assert chat_bytes.decode(ids) == 'system: be brief\nuser: abcde [...] qrst\nassistant:' and len(ids) == 50


def uf_split(tokenizer, directory, tmp_path, sft_mode=False):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)  # the slice's 4 rows with chosen == rejected
        return pd.load_tokenized(str(directory), tokenizer, 'train', max_length=512, max_prompt_length=256,
                                 sft_mode=sft_mode, silent=True, cache_dir=tmp_path)


def test_long_ultrafeedback_prompts_keep_their_generation_prompt(smollm2_tokenizer, ultrafeedback_messages, tmp_path):
    """The real UltraFeedback messages slice (996 train pairs, one prompt each) with SmolLM2's template at
    max_length=512, max_prompt_length=256. 483 pairs are too long (prompt + longer response > 512); 198 of their
    prompts hold more than 256 tokens, and cut with keep_start (before) every one of those lost
    '<|im_end|>\n<|im_start|>assistant\n'. Now all 996 prompts end with the generation prompt [1, 520, 9531, 198];
    prompt + longer response ≤ 512; the 513 that fit, and the 285 too long ones whose prompt fits in 256 tokens, are
    the rendered text's ids exactly; the 198 others hold at most 256 tokens, keep the template's system message and
    the end of the user message (its middle cut out), and are followed by their response's ids as they were (cut to
    512 − 256 where still too long, as in the original)."""
    split = uf_split(smollm2_tokenizer, ultrafeedback_messages, tmp_path)
    assert split.n_examples == len(split.prompts) == 996
    full_prompts = pd.encode_texts(smollm2_tokenizer, split.prompts, parse_special_tokens=True)
    responses = pd.encode_texts(smollm2_tokenizer, [r.rstrip() for r in split.responses], parse_special_tokens=True)
    assert all(split.prompt_ids[e][-4:].tolist() == GENERATION_PROMPT for e in range(996))
    assert split.example_lengths(sft_mode=False).max() <= 512
    too_long, middle_cut = [], []
    for e in range(996):
        chosen, rejected = responses[split.chosen_response[e]], responses[split.rejected_response[e]]
        prompt = split.prompt_ids[e].tolist()
        if len(full_prompts[e]) + max(len(chosen), len(rejected)) <= 512:
            assert prompt == full_prompts[e]
            continue
        too_long.append(e)
        assert len(prompt) <= 256
        budget = 512 - 256 if len(prompt) + max(len(chosen), len(rejected)) > 512 else None
        assert split.chosen_ids[e].tolist() == chosen[:budget] and split.rejected_ids[e].tolist() == rejected[:budget]
        if len(full_prompts[e]) <= 256:  # too long only with its response: rendered again, the same ids
            assert prompt == full_prompts[e]
            continue
        middle_cut.append(e)
        text = smollm2_tokenizer.decode(prompt)
        assert text.startswith(SMOLLM2_SYSTEM + '<|im_start|>user\n') and ' [...] ' in text
        last_user = split.prompts[e][:-len('<|im_end|>\n<|im_start|>assistant\n')]
        assert text.endswith(last_user[-20:] + '<|im_end|>\n<|im_start|>assistant\n')
    assert (len(too_long), len(middle_cut)) == (483, 198)


def test_long_hh_dialogues_drop_their_oldest_exchanges(smollm2_tokenizer, hh_slice_dir, tmp_path):
    """HH rendered through SmolLM2's template (render_hh_with_chat_template) at max_length=256,
    max_prompt_length=128: a too long dialogue keeps its last exchanges instead of its last 128 tokens (hh's
    keep_end would start it inside a message, without the system turn). Each re-rendered prompt is the template's
    rendering of the longest run of whole exchanges at the end (from a user message) that fits in 128 tokens, where
    one fits; else the last user message alone with its middle cut out. 2,307 pairs, all ending with the generation
    prompt, every row within 256 tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        loaded, source = ds.load_source(f'hh:{hh_slice_dir}', 'test', True, None, smollm2_tokenizer,
                                        {'render_hh_with_chat_template': True})
    assert source.truncation_mode == 'keep_end' and loaded.chat_rendered
    split = pd.tokenize_split(loaded.data, smollm2_tokenizer, source.truncation_mode, 256, 128, chat_rendered=True,
                              messages=loaded.messages)
    assert split.n_examples == 2307 and split.example_lengths(sft_mode=False).max() <= 256
    assert all(split.prompt_ids[e][-4:].tolist() == GENERATION_PROMPT for e in range(split.n_examples))
    render = lambda messages: pd.encode_texts(smollm2_tokenizer, [smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)], parse_special_tokens=True)[0]
    prompt_of = np.repeat(np.arange(len(split.prompts)), np.diff(split.group_offsets))
    kinds = {'whole': 0, 'exchanges dropped': 0, 'middle cut': 0}
    for e in range(split.n_examples):
        messages = loaded.messages[split.prompts[prompt_of[e]]]
        ids = split.prompt_ids[e].tolist()
        if ids == render(messages):
            kinds['whole'] += 1
            continue
        fitting = [k for k in range(1, len(messages)) if messages[k]['role'] == 'user' and len(render(messages[k:])) <= 128]
        if fitting:
            assert ids == render(messages[fitting[0]:])
            kinds['exchanges dropped'] += 1
        else:
            text = smollm2_tokenizer.decode(ids)
            assert len(ids) <= 128 and text.count('<|im_start|>user') == 1 and ' [...] ' in text
            kinds['middle cut'] += 1
    assert kinds == {'whole': 2307 - 618, 'exchanges dropped': 617, 'middle cut': 1}


def test_generation_prompts_are_cut_the_same_way(smollm2_tokenizer, ultrafeedback_messages):
    """evaluate.py's prompts (generation.encode_prompts) within 64 tokens: a rendered UltraFeedback prompt is cut
    inside its conversation as in training, so it opens with the template's system turn and a user turn and ends
    with the generation prompt (keeping its last 64 tokens, as before, started it inside the user message); an
    HH-format prompt still keeps its last 64 tokens."""
    from generation import Prompt, encode_prompts, load_prompts
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)
        prompts = load_prompts([str(ultrafeedback_messages)], 'test', 8, smollm2_tokenizer)
    hh = Prompt('\n\nHuman: ' + 'word ' * 100 + '\n\nAssistant:', ' ok', 'hh')
    ids = encode_prompts(smollm2_tokenizer, [*prompts, hh], 64)
    for prompt, row in zip(prompts, ids):
        assert row == pd.chat_prompt_ids(smollm2_tokenizer, prompt.messages, 64) and len(row) <= 64
        assert row[-4:] == GENERATION_PROMPT
        assert smollm2_tokenizer.decode(row).startswith(SMOLLM2_SYSTEM + '<|im_start|>user\n')
    assert ids[-1] == pd.encode_texts(smollm2_tokenizer, [hh.text])[0][-64:]
