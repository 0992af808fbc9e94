"""Batched generation (generation.py): seeded, the same greedy text batched as one prompt at a time, stops at EOS or
the chat template's end-of-turn token, and names a model source or a data source it cannot use."""
import json

import pytest
import torch

from conftest import write_rows
from generation import (LoadedModel, Prompt, completion_sample, encode_prompts, generate, load_model, load_prompts,
                        model_kind, response_text, stop_token_ids)
from scripts.generate import main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The embedded tiny model with random weights: its samples are varied byte strings that rarely stop."""
    return load_model('embedded:tiny', 'cpu', local_dirs=[str(tmp_path_factory.mktemp('cache'))])


@pytest.fixture(scope='module')
def synthetic_ids(tiny):
    prompts = load_prompts(['synthetic'], 'test', 12, tiny.tokenizer, dataset_options={'synthetic': {'n_test': 16}})
    return encode_prompts(tiny.tokenizer, prompts, 64)


def texts(samples):
    return [[s.completion for s in row] for row in samples]


def test_the_same_seed_gives_the_same_samples(tiny, synthetic_ids):
    """T=1, 3 samples of 12 prompts: seed 5 twice gives the same 36 texts, seed 6 others; the caller's RNG is
    left as it was."""
    before = torch.random.get_rng_state()
    first = generate(tiny, synthetic_ids, n=3, temperature=1.0, max_new_tokens=8, seed=5, batch_size=5, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = generate(tiny, synthetic_ids, n=3, temperature=1.0, max_new_tokens=8, seed=5, batch_size=5, progress=False)
    other = generate(tiny, synthetic_ids, n=3, temperature=1.0, max_new_tokens=8, seed=6, batch_size=5, progress=False)
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    assert [[(s.prompt_index, s.sample_index) for s in row] for row in first] == [[(i, k) for k in range(3)] for i in range(12)]
    assert len({t for row in texts(first) for t in row}) > 30  # sampled, not one repeated answer


def test_batched_greedy_equals_one_prompt_at_a_time(tiny, synthetic_ids):
    """Left padding with the attention mask changes nothing: prompts of 27 to 38 tokens in batches of 5 decode to
    the same ids as each prompt alone."""
    lengths = {len(p) for p in synthetic_ids}
    assert len(lengths) > 3
    batched = generate(tiny, synthetic_ids, max_new_tokens=12, batch_size=5, progress=False)
    alone = generate(tiny, synthetic_ids, max_new_tokens=12, batch_size=1, progress=False)
    assert [row[0].completion_ids for row in batched] == [row[0].completion_ids for row in alone]


def test_a_sample_ends_at_its_first_stop_token(byte_tokenizer):
    """Ids 'h','i',EOS,'x',pad: the text is 'hi', the ids keep EOS (it was sampled), the rest is dropped."""
    eos = byte_tokenizer.eos_token_id
    h, i, x = byte_tokenizer.convert_tokens_to_ids(['h', 'i', 'x'])
    sample = completion_sample(byte_tokenizer, [h, i, eos, x, eos], [eos], 3, 1)
    assert (sample.completion, sample.completion_ids, sample.stopped) == ('hi', [h, i, eos], True)
    running = completion_sample(byte_tokenizer, [h, i, x], [eos], 3, 1)
    assert (running.completion, running.stopped) == ('hix', False)


def test_the_chat_templates_end_of_turn_stops_generation(tmp_path):
    """A ChatML template closes a turn with <|im_end|>, a special token other than EOS: both stop a response, and a
    chat-rendered chosen response ('Paris.<|im_end|>\\n') is cut there for the judge."""
    from models import build_byte_tokenizer
    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({'additional_special_tokens': ['<|im_end|>', '<|im_start|>']})
    tokenizer.chat_template = CHATML
    im_end = tokenizer.convert_tokens_to_ids('<|im_end|>')
    assert stop_token_ids(tokenizer) == sorted([tokenizer.eos_token_id, im_end])
    tokenizer.chat_template = None
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
    tokenizer.chat_template = CHATML
    loaded = LoadedModel(torch.nn.Linear(1, 1), tokenizer, 'x', stop_token_ids(tokenizer))
    assert response_text(loaded, Prompt('<|im_start|>user\nq<|im_end|>\n', 'Paris.<|im_end|>\n', 'd', True)) == 'Paris.'
    assert response_text(loaded, Prompt('\n\nHuman: q\n\nAssistant:', ' Paris.', 'd', False)) == ' Paris.'


@pytest.mark.slow
def test_model_sources_that_are_not_models_are_named(tmp_path, short_sft_run):
    assert model_kind(str(short_sft_run)) == 'run'
    assert model_kind(str(short_sft_run / 'hf_model')) == 'hf'
    assert model_kind('embedded:tiny') == 'embedded'
    with pytest.raises(ValueError, match=r'nowhere: no such directory, and not a Hub id'):
        model_kind(str(tmp_path / 'nowhere'))
    with pytest.raises(ValueError, match=r'not a model directory \(no config.yaml of a train.py run, no config.json'):
        model_kind(str(tmp_path))
    (tmp_path / 'weights.bin').write_bytes(b'x')
    with pytest.raises(ValueError, match=r'weights.bin: a file, but not a .gguf model'):
        model_kind(str(tmp_path / 'weights.bin'))
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.yaml').write_text('datasets: [hh]\n')
    with pytest.raises(ValueError, match=r'a run directory without weights \(no LATEST/policy.pt and no hf_model/\)'):
        model_kind(str(tmp_path / 'run'))


@pytest.mark.slow
def test_a_run_directory_loads_its_latest_weights(short_sft_run):
    """The run's LATEST/policy.pt and its hf_model/ export are the same weights: the same logits."""
    from_run, from_export = load_model(str(short_sft_run), 'cpu'), load_model(str(short_sft_run / 'hf_model'), 'cpu')
    ids = torch.tensor([[10, 72, 117, 109, 97]])
    torch.testing.assert_close(from_run.model(ids).logits, from_export.model(ids).logits, rtol=0, atol=0)


def test_a_data_source_without_prompts_is_named(tmp_path, byte_tokenizer):
    """Ten rows in one file: its test part is int(10 · 1%) = 0 rows, so there is no prompt to answer."""
    path = write_rows(tmp_path / 'ten.jsonl', [{'prompt': f'q{i}', 'chosen': 'a', 'rejected': 'b'} for i in range(10)])
    with pytest.raises(ValueError, match=r"datasets: '.*ten.jsonl' has no prompts in its test split"):
        load_prompts([str(path)], 'test', 8, byte_tokenizer)
    train = load_prompts([str(path)], 'train', None, byte_tokenizer)
    assert sorted(p.text for p in train) == [f'\n\nHuman: q{i}\n\nAssistant:' for i in range(10)]
    assert {p.chosen for p in train} == {' a'}


@pytest.mark.slow
def test_the_command_line_writes_json_lines(tmp_path, short_sft_run):
    """python scripts/generate.py RUN --n-prompts 4 --n 2 --temperature 0.5: 8 rows with the prompt, the completion and
    the settings."""
    out = tmp_path / 'samples.jsonl'
    main([str(short_sft_run), '--n-prompts', '4', '--n', '2', '--temperature', '0.5', '--max-new-tokens', '16',
          '--out', str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r['prompt_index'], r['sample_index']) for r in rows] == [(i, k) for i in range(4) for k in range(2)]
    assert all(r['temperature'] == 0.5 and r['prompt'].startswith('\n\nHuman: ') and r['dataset'] == 'synthetic'
               for r in rows)
