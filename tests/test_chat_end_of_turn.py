"""Chat data ends each response with exactly one end-of-turn token: the real SmolLM2 tokenizer and chat template
on the real UltraFeedback messages slice; HH text data keeps its appended EOS, or goes through the template on request."""
import warnings

import numpy as np
import pytest

import chat_format

import data_sources as ds

import preference_datasets as pd

IM_END = 2  # SmolLM2's <|im_end|>: its chat template's end of turn and its EOS


def tokenized(name, tokenizer, split, tmp_path, sft_mode=False, **options):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)  # the slice's 4 + 1 rows with chosen == rejected
        return pd.load_tokenized(name, tokenizer, split, max_length=100_000, max_prompt_length=100_000, sft_mode=sft_mode,
                                 silent=True, cache_dir=tmp_path, dataset_options=options)


@pytest.mark.parametrize('split, n_pairs', [('train', 996), ('test', 199)])
def test_ultrafeedback_responses_end_with_one_end_of_turn(smollm2_tokenizer, ultrafeedback_messages, tmp_path, split, n_pairs):
    """Rendered, a response is 'text<|im_end|>\\n'; tokenized (nothing truncated at these lengths), every chosen and
    rejected response of the 996 train / 199 test pairs, and every SFT target, ends with <|im_end|> (id 2) and holds
    no other: no '\\n<|im_end|>' after it, as appending EOS gave. The first test pair's chosen ends
    ' for others.<|im_end|>' = [327, 1449, 30, 2]; every prompt ends '<|im_start|>assistant\\n' = [1, 520, 9531, 198]."""
    assert chat_format.end_of_turn_token_id(smollm2_tokenizer) == IM_END == smollm2_tokenizer.eos_token_id
    pairs = tokenized(str(ultrafeedback_messages), smollm2_tokenizer, split, tmp_path)
    sft = tokenized(str(ultrafeedback_messages), smollm2_tokenizer, split, tmp_path, sft_mode=True)
    assert pairs.n_examples == n_pairs == sft.n_examples
    responses = [pairs.chosen_ids[e] for e in range(n_pairs)] + [pairs.rejected_ids[e] for e in range(n_pairs)]
    responses += [sft.chosen_ids[e] for e in range(n_pairs)]
    assert all(ids[-1] == IM_END and np.count_nonzero(ids == IM_END) == 1 for ids in responses)
    assert all(pairs.responses[i].endswith('<|im_end|>\n') for i in pairs.chosen_response)
    assert all(pairs.prompt_ids[e][-4:].tolist() == [1, 520, 9531, 198] for e in range(n_pairs))
    if split == 'test':
        assert pairs.chosen_ids[0][-4:].tolist() == [327, 1449, 30, 2]


def test_generation_stops_at_the_end_of_turn(smollm2_local_dirs):
    """The converted model's generation config stops at <|im_end|>, the token that ends every trained response."""
    from transformers import GenerationConfig
    eos = GenerationConfig.from_pretrained(smollm2_local_dirs[1]).eos_token_id
    assert IM_END in (eos if isinstance(eos, list) else [eos])


def test_hh_text_keeps_its_appended_eos(smollm2_tokenizer, hh_slice_dir, tmp_path):
    """HH text with an instruct model, the original behaviour: no template, the model reads '\\n\\nHuman: ...
    \\n\\nAssistant:' as plain text, and each response is its text's tokens + EOS (<|im_end|> for SmolLM2),
    special-token text in the data tokenized as text. 2307 pairs, as with any tokenizer."""
    split = tokenized(f'hh:{hh_slice_dir}', smollm2_tokenizer, 'test', tmp_path)
    assert split.n_examples == 2307
    assert split.prompts[0].startswith('\n\nHuman:') and split.prompts[0].endswith('\n\nAssistant:')
    for e in range(0, split.n_examples, 50):
        text = split.responses[split.chosen_response[e]]
        expected = smollm2_tokenizer(text, add_special_tokens=False, split_special_tokens=True)['input_ids'] + [IM_END]
        assert split.chosen_ids[e].tolist() == expected


def test_hh_rendered_with_the_chat_template(smollm2_tokenizer, hh_slice_dir, tmp_path):
    """render_hh_with_chat_template: the same 2307 pairs under 2305 prompts, each dialogue as system (the
    template's default), user and assistant turns; responses end with one <|im_end|>."""
    split = tokenized(f'hh:{hh_slice_dir}', smollm2_tokenizer, 'test', tmp_path, render_hh_with_chat_template=True)
    assert split.n_examples == 2307 and len(split.prompts) == 2305
    assert all(p.startswith('<|im_start|>system\n') and p.endswith('<|im_start|>assistant\n') for p in split.prompts)
    multi_turn = next(p for p in split.prompts if p.count('<|im_start|>user') == 2)
    assert '<|im_end|>\n<|im_start|>assistant\n' in multi_turn[:-len('<|im_start|>assistant\n')]
    assert all(split.chosen_ids[e][-1] == IM_END and np.count_nonzero(split.chosen_ids[e] == IM_END) == 1
               for e in range(split.n_examples))


def test_hh_messages():
    """The HH dialogue format as messages: the Human and Assistant turns in order, texts stripped, the final
    empty Assistant turn (the one to answer) dropped."""
    prompt = '\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\nAssistant:'
    assert chat_format.hh_messages(prompt) == [{'role': 'user', 'content': 'Hi there'},
                                      {'role': 'assistant', 'content': 'Hello! How can I help?'},
                                      {'role': 'user', 'content': 'Name a colour.'}]


def test_hh_rendering_needs_a_chat_template(neox_tokenizer, hh_slice_dir):
    with pytest.raises(ValueError, match='render_hh_with_chat_template=true needs a tokenizer with a chat template'), \
            warnings.catch_warnings():
        warnings.simplefilter('ignore', ds.DataWarning)  # the 5 HH rows left out while loading, before rendering
        pd.get_dataset(f'hh:{hh_slice_dir}', 'test', silent=True, tokenizer=neox_tokenizer,
                       dataset_options={'render_hh_with_chat_template': True})
