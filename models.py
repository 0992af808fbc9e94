"""Building the policy, the frozen reference and the tokenizer; the embedded tiny model and its byte tokenizer.

    from models import build_models, load_tokenizer
    policy, reference = build_models(config, parallelism)   # model.archive / resume_from loaded
    tokenizer = load_tokenizer(config)                      # pad = EOS where the tokenizer has none

`model.name_or_path` is a Hub id, a local Hugging Face directory, or `embedded:NAME`: a small model built
here from code (random weights, a byte-level tokenizer) and saved once with `save_pretrained`, so that
`python train.py` needs no download and still loads through the same `from_pretrained` path as a Hub model.
"""
import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from checkpoints import atomic_path, load_checkpoint_file, load_state_dict_checked
from distributed import DistributedSetup, Parallelism
from utils import file_identity, fingerprint, get_local_dir, rank0_print


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
    if target.is_dir():
        problems = model_file_problems(target, 'the embedded model cache')
        if not problems:
            return str(target)
        rank0_print(f'{target}: damaged cache ({"; ".join(problems)}); rebuilding it')
        set_aside = target.with_name(f'.{target.name}.damaged-{os.getpid()}')
        with contextlib.suppress(FileNotFoundError):  # another run may have set it aside first
            os.rename(target, set_aside)
        shutil.rmtree(set_aside, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):  # seed 0 for these weights, without touching the caller's RNG
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    # replace=False: two runs started together both build it; the first complete one stays, the other is dropped
    with atomic_path(target, directory=True, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in `model` to 0 (DPO's log-ratios must be deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, 'config', None)
    for name in ('attention_dropout', 'hidden_dropout', 'attn_pdrop', 'resid_pdrop', 'embd_pdrop',
                 'classifier_dropout', 'dropout'):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


# Files one of which every tokenizer directory holds (transformers' fast, BPE, WordPiece and SentencePiece formats)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'vocab.txt', 'merges.txt',
                   'tokenizer.model', 'spiece.model', 'sentencepiece.bpe.model', 'tekken.json')


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
    """Everything wrong with local model and tokenizer directories, found before anything is loaded: damaged files,
    no tokenizer, and code a directory asks to run (config.json's or tokenizer_config.json's `auto_map`), which is
    refused unless trust_remote_code=true. Hub ids are checked by transformers itself, which runs no code from
    them either while trust_remote_code is false. model_key: the option that named the model, for the messages."""
    problems = []
    model_dir = local_directory(name_or_path)
    tokenizer_key = 'model.tokenizer_name_or_path' if tokenizer_name_or_path else model_key
    tokenizer_dir = local_directory(tokenizer_name_or_path or name_or_path)
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
    """ValueError naming every problem of model_directory_problems for a model directory given by path alone
    (generation.load_model: evaluate.py, sample_pairs.py), where trust_remote_code is never set."""
    problems = model_directory_problems(str(path), None, trust_remote_code=False, model_key='model')
    if problems:
        raise ValueError(f'{path} cannot be loaded:\n  - ' + '\n  - '.join(problems))


@contextlib.contextmanager
def named_if_unreadable_gguf(path: Union[str, Path]) -> Iterator[None]:
    """Name the file when a GGUF model or tokenizer fails to load inside the gguf parser: a truncated file fails there
    with `ValueError: cannot reshape array of size 66784 into shape (576,360)`, a cut header with a struct.error."""
    try:
        yield
    except (ValueError, IndexError, EOFError, struct.error) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f'{path} could not be read as a GGUF model ({type(e).__name__}: '
                         f'{(str(e).splitlines() or [""])[0][:200]}): the file is truncated or damaged (download it '
                         f'again), or holds an architecture transformers does not read from GGUF') from None


def trusts_remote_code(config: DictConfig) -> bool:
    """config.trust_remote_code; false for the config.yaml of a run written before the key existed (sample_pairs.py
    reads those)."""
    return OmegaConf.select(config, 'trust_remote_code', default=False) is True


def refuse_bad_model_directories(config: DictConfig) -> None:
    """ValueError naming every problem of model_directory_problems (build_model and load_tokenizer call it, so
    scripts other than train.py, which already validated them, are covered too)."""
    problems = model_directory_problems(config.model.name_or_path, config.model.tokenizer_name_or_path,
                                        trusts_remote_code(config))
    if problems:
        raise ValueError('the model cannot be loaded:\n  - ' + '\n  - '.join(problems))


def build_model(config: DictConfig, dtype_name: str, device_map: Optional[str], empty: bool = False) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained of config.model.name_or_path (Hub id, directory or embedded:NAME).

    empty: the same model on the meta device, without weights and without memory (see build_models).
    """
    import transformers
    refuse_bad_model_directories(config)
    path = materialize_embedded_model(config.model.name_or_path, get_local_dir(config.local_dirs))
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
    """The policy and, with_reference (the DPO family), the frozen reference, with model.archive (or a
    resume) loaded.

    empty: models without weights on the meta device, for the ranks other than 0 of FSDPTrainer and
    TensorParallelTrainer, which receive rank 0's weights once the models are split (so a machine
    holds one full copy of the model in memory, not one per process).
    """
    policy = build_model(config, config.model.policy_dtype, parallelism.device_map, empty)
    reference_model = None
    if with_reference:
        reference_model = build_model(config, config.model.reference_dtype, parallelism.device_map, empty)
        reference_model.requires_grad_(False)
    if empty:
        return policy, reference_model

    if config.model.archive is not None:
        archive = load_checkpoint_file(config.model.archive, 'model.archive')
        rank0_print(f'loading pre-trained weights at step {archive.get("step_idx")} from {config.model.archive}')
        load_state_dict_checked(policy, archive['state'], f'model.archive {config.model.archive}')
        if reference_model is not None:
            load_state_dict_checked(reference_model, archive['state'], f'model.archive {config.model.archive}')
    if config.resume_from is not None:
        checkpoint = Path(config.resume_from) / 'LATEST' / 'policy.pt'
        load_state_dict_checked(policy, load_checkpoint_file(checkpoint, 'resume checkpoint')['state'], str(checkpoint))

    tokenizer_vocab = check_tokenizer_fits(config, policy)
    rank0_print(f'policy: {sum(p.numel() for p in policy.parameters()):,} parameters, tokenizer of {tokenizer_vocab} tokens')
    if parallelism.whole_model_on_gpu:
        policy.to('cuda')
        if reference_model is not None:
            reference_model.to('cuda')
    return policy, reference_model


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
    """The tokenizer of config.model (a Hub id, a directory, or an embedded model); pad = EOS if unset."""
    import transformers
    refuse_bad_model_directories(config)
    name = config.model.tokenizer_name_or_path or config.model.name_or_path
    path = materialize_embedded_model(name, get_local_dir(config.local_dirs))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, cache_dir=get_local_dir(config.local_dirs),
                                                           trust_remote_code=trusts_remote_code(config))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def model_identity(name_or_path: str, local_dir: str) -> List:
    """What identifies a model's weights: the files of a local directory (or embedded model), else the Hub id."""
    path = Path(materialize_embedded_model(name_or_path, local_dir)).expanduser()
    if not path.is_dir():
        return [name_or_path]
    return [file_identity(f) for f in sorted(path.iterdir())
            if f.suffix in ('.json', '.safetensors', '.bin', '.pt') and not f.name.startswith('tokenizer')]


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside any wrapper."""
    return getattr(model, 'module', model)


def first_device(model: nn.Module) -> torch.device:
    """Where a (possibly GPU-split) model takes its inputs."""
    device_map = getattr(model, 'hf_device_map', None)
    if device_map:
        first = next(iter(device_map.values()))
        return torch.device(f'cuda:{first}' if isinstance(first, int) else first)
    return next(model.parameters()).device


def materialize_in_turn(config: DictConfig, setup: DistributedSetup) -> None:
    """Write the embedded model (model.name_or_path=embedded:NAME) before any process reads it: rank 0
    first, then the first process of each other machine (in case they share no disk). Collective."""
    import torch.distributed as dist
    for writes in (setup.rank == 0, setup.local_rank == 0):
        if writes:
            materialize_embedded_model(config.model.name_or_path, get_local_dir(config.local_dirs))
        dist.barrier()
