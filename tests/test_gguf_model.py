"""A GGUF file as the model (models.py): converted once into a float32 Hugging Face directory, found again by
the file's identity, equal to what transformers loads from the GGUF itself; damaged files refused by name."""
import json
import os
import shutil
import time

import pytest
import torch

from models import gguf_cache_dir, materialize_model

PROMPT = 'The capital of France is Paris, and the capital of Germany is'


def test_conversion_gives_the_gguf_models_logits(smollm2_gguf, smollm2_local_dirs):
    """The converted directory, loaded with a plain from_pretrained, gives bitwise the logits of the model
    transformers loads from the GGUF (the same dequantized float32 weights), with no quantization config
    left; 210 of the 272 tensors were Q4_1, the embedding Q8_0, the norms F32. The next token after the
    prompt is ' Berlin' (id 11452) for both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, converted = smollm2_local_dirs
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = torch.tensor([tokenizer(PROMPT)['input_ids']])
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    assert torch.equal(got, expected)
    assert got[0, -1].argmax().item() == 11452 and tokenizer.decode([11452]) == ' Berlin'
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert 'quantization_config' not in json.loads((converted / 'config.json').read_text())
    assert json.loads((converted / 'gguf_source.json').read_text())['tensor_types'] == {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}


def test_converted_model_answers_and_stops_at_end_of_turn(smollm2_local_dirs):
    """Through its chat template the converted model answers 'What is the capital of France?' with 'The capital
    of France is Paris.' (greedy) and stops at <|im_end|> (id 2), which its generation config lists as EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _, converted = smollm2_local_dirs
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    eos = model.generation_config.eos_token_id
    assert tokenizer.convert_tokens_to_ids('<|im_end|>') == 2 and 2 in (eos if isinstance(eos, list) else [eos])
    inputs = tokenizer.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                           add_generation_prompt=True, return_tensors='pt', return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, inputs['input_ids'].shape[1]:]
    assert tokenizer.decode(output) == 'The capital of France is Paris.<|im_end|>'


def test_second_load_uses_the_conversion(smollm2_gguf, smollm2_local_dirs):
    """A second materialize_model of the same file returns the same directory at once, untouched (same
    modification times); a file rewritten (new mtime) or moved gets a new cache directory."""
    root, converted = smollm2_local_dirs
    cache_root = converted.parents[1]
    before = (converted.stat().st_mtime_ns, (converted / 'model.safetensors').stat().st_mtime_ns)
    start = time.time()
    assert materialize_model(str(smollm2_gguf), cache_root) == str(converted)
    assert time.time() - start < 1.0
    assert (converted.stat().st_mtime_ns, (converted / 'model.safetensors').stat().st_mtime_ns) == before
    copy = root / 'copy.gguf'
    shutil.copy2(smollm2_gguf, copy)  # same size and mtime, another path
    assert gguf_cache_dir(copy, cache_root) != converted
    key = gguf_cache_dir(copy, cache_root)
    os.utime(copy, ns=(time.time_ns(), time.time_ns()))
    assert gguf_cache_dir(copy, cache_root) != key
    copy.unlink()


def test_truncated_gguf_is_refused_by_name(smollm2_gguf, tmp_path):
    """The first 3 MB of the real file (its header and tokenizer parse, its tensors do not): a ValueError that
    names the file and says it is truncated, not the parser's reshape error."""
    truncated = tmp_path / 'truncated.gguf'
    with open(smollm2_gguf, 'rb') as f:
        truncated.write_bytes(f.read(3_000_000))
    with pytest.raises(ValueError, match=rf'{truncated} is truncated or damaged'):
        materialize_model(str(truncated), tmp_path / 'cache')
    assert not (tmp_path / 'cache' / 'gguf_models').exists() or not any((tmp_path / 'cache' / 'gguf_models').iterdir())


@pytest.mark.parametrize('content', [b'', b'not a model at all\n' * 10, b'GGUF\x03\x00\x00\x00garbage'])
def test_garbage_gguf_is_refused_by_name(tmp_path, content):
    """An empty file, a text file and a file with the magic but garbage after it: ValueError naming the file."""
    path = tmp_path / 'model.gguf'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf'{path} is (not a GGUF file|truncated or damaged)'):
        materialize_model(str(path), tmp_path / 'cache')


def test_missing_gguf_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=rf'the GGUF file {tmp_path}/absent.gguf does not exist'):
        materialize_model(str(tmp_path / 'absent.gguf'), tmp_path / 'cache')
