"""Batched sampling from a trained policy: prompts of any data source in, completions (JSON lines) out.

    # 4 samples at temperature 0.7 for the first 64 HH test prompts, from a run's LATEST checkpoint
    python scripts/generate.py RUN_DIR --datasets hh --n-prompts 64 --n 4 --temperature 0.7 --out samples.jsonl

    from generation import load_model, load_prompts, encode_prompts, generate
    model = load_model('RUN_DIR')                  # or RUN_DIR/hf_model, any HF directory, a .gguf, embedded:tiny
    prompts = load_prompts(['hh'], 'test', 64, model.tokenizer)
    ids = encode_prompts(model.tokenizer, prompts, max_prompt_length=256)
    samples = generate(model, ids, n=4, temperature=0.7, seed=0)   # samples[i][k]: k-th sample of prompt i

A model source is a run directory of train.py (its config.yaml says which model and tokenizer to build,
LATEST/policy.pt holds the weights; a run without a checkpoint but with hf_model/ uses that), a Hugging Face
model directory (config.json), a .gguf file (read by transformers with the `gguf` package), `embedded:NAME`
(the project's built-in models), or a Hub id already in the local Hugging Face cache.

Generation runs in one process on one device (under FSDP/TP sampling is slow: export, then sample here).
Prompts are left-padded, batched by length (fewer pad tokens), decoded with the KV cache, and each sequence
stops at EOS or at the chat template's end-of-turn token (`<|im_end|>` for SmolLM2). Sampling is seeded:
the same seed, prompts and settings give the same text. Temperature 0 is greedy decoding.
"""
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import tqdm

from checkpoints import atomic_write_text
from distributed import all_gather_if_needed
from chat_format import Messages, hh_messages, hh_text
from data_sources import load_source
from models import check_model_directory, load_tokenizer, materialize_model, missing_model_reason
from preference_datasets import chat_prompt_ids, encode_texts
from utils import DummyWandb, UserError, get_local_dir, pad_to_length, rank0_print

# Where the embedded model and the Hugging Face cache go when the source does not say (train.py's default).
DEFAULT_LOCAL_DIRS = ('/scr-ssd', '/scr', '.cache')


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer (pad = EOS where it had none) and where it came from; whether it was
    trained on chat-rendered HH-format prompts, where its source says (trained_chat_rendering), else None."""
    model: nn.Module
    tokenizer: object
    source: str
    stop_ids: List[int]
    render_hh_with_chat_template: Optional[bool] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class Prompt:
    """One prompt to answer: the text the model continues, the data set's preferred response to it (the
    reference a pairwise judge compares against), whether the text came out of a chat template, and the
    messages it was rendered from (None for an HH-format text: its messages are read from the text)."""
    text: str
    chosen: str
    dataset: str
    chat_rendered: bool = False
    messages: Optional[Messages] = None

    @property
    def dialogue(self) -> Messages:
        """The prompt's messages, free of any chat template's markup: what judges and reward models read."""
        if self.messages is not None:
            return self.messages
        assert not self.chat_rendered, 'a chat-rendered Prompt needs the messages it was rendered from'
        return hh_messages(self.text)

    @property
    def plain_text(self) -> str:
        """The dialogue as HH-format text ('\\n\\nHuman: ...\\n\\nAssistant:'): the text itself unless chat-rendered."""
        return hh_text(self.dialogue) if self.chat_rendered else self.text


@dataclass
class Sample:
    """One completion: its text (stop token and anything after it removed), the generated token ids (the
    stop token included when the sequence stopped: it is part of what was sampled), and whether it stopped
    before max_new_tokens."""
    prompt_index: int
    sample_index: int
    completion: str
    completion_ids: List[int] = field(repr=False)
    stopped: bool


# ----------------------------------------------------------------------------------------------------------
# Model sources


def model_kind(source: str) -> str:
    """'run', 'hf', 'gguf', 'embedded' or 'hub' for a model source, without loading anything; UserError
    naming the path and what is expected when it is none of them."""
    if source.startswith('embedded:'):
        return 'embedded'
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / 'config.yaml').is_file():
            if not ((path / 'LATEST' / 'policy.pt').is_file() or (path / 'hf_model' / 'config.json').is_file()):
                raise UserError(f'{source}: a run directory without weights (no LATEST/policy.pt and no '
                                f'hf_model/); pass a run that saved a checkpoint')
            return 'run'
        if (path / 'config.json').is_file():
            return 'hf'
        raise UserError(f'{source}: not a model directory (no config.yaml of a train.py run, no config.json of a '
                        f'Hugging Face model); pass a run directory, its hf_model/, or a model directory')
    if path.is_file():
        if path.name.endswith('.gguf'):
            return 'gguf'
        raise UserError(f'{source}: a file, but not a .gguf model; pass a run directory, a Hugging Face model '
                        f'directory or a .gguf file')
    reason = missing_model_reason(source)
    if reason:
        raise UserError(f'{source}: {reason}')
    return 'hub'


def load_model(source: str, device: Optional[str] = None, dtype: str = 'float32',
               local_dirs: Sequence[str] = DEFAULT_LOCAL_DIRS) -> LoadedModel:
    """The model of `source` (see the module docstring) in eval mode on `device` (default: cuda if available)."""
    import transformers
    kind = model_kind(source)
    cache_dir = get_local_dir(list(local_dirs))
    if kind == 'run':
        model, tokenizer = _load_run(Path(source).expanduser(), dtype)
    else:
        if kind == 'hf':
            check_model_directory(Path(source).expanduser())
        # a .gguf file is converted once (and cached), embedded:NAME built once, a Hub id with a GGUF copy falls
        # back to it offline: models.materialize_model, as train.py loads them
        path = materialize_model(str(Path(source).expanduser()) if kind != 'hub' else source, cache_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, cache_dir=cache_dir, dtype=getattr(torch, dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = model.to(device).eval()
    return LoadedModel(model, tokenizer, source, stop_token_ids(tokenizer, model), trained_chat_rendering(source))


def trained_chat_rendering(source: str) -> Optional[bool]:
    """train.py's render_hh_with_chat_template of the run a model source comes from: a run directory's config.yaml,
    or the training_options.json its export hf_model/ carries (checkpoints.export_hf_model); None for a model that
    says nothing (a Hub id, a .gguf, an embedded model, a directory of another trainer)."""
    from omegaconf import OmegaConf
    from checkpoints import TRAINING_OPTIONS_FILE
    kind = model_kind(source)
    path = Path(source).expanduser()
    if kind == 'run':
        return OmegaConf.select(OmegaConf.load(path / 'config.yaml'), 'render_hh_with_chat_template',
                                default=False) is True
    options = path / TRAINING_OPTIONS_FILE
    if kind == 'hf' and options.is_file():
        value = json.loads(options.read_text()).get('render_hh_with_chat_template')
        return value if isinstance(value, bool) else None
    return None


def _load_run(run_dir: Path, dtype: str):
    """(model, tokenizer) of a train.py run: built as its config.yaml says, LATEST/policy.pt loaded."""
    from omegaconf import OmegaConf
    from models import build_model, load_archive
    checkpoint = run_dir / 'LATEST' / 'policy.pt'
    if not checkpoint.is_file():
        import transformers
        hf_dir = run_dir / 'hf_model'
        return (transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)),
                transformers.AutoTokenizer.from_pretrained(hf_dir))
    config = OmegaConf.load(run_dir / 'config.yaml')
    model = build_model(config, dtype, None)
    load_archive([model], checkpoint, config.model.name_or_path)  # a LoRA run's adapters merged into its base
    return model, load_tokenizer(config)


def load_tokenizer_of(source: str, local_dirs: Sequence[str] = DEFAULT_LOCAL_DIRS):
    """The tokenizer `load_model(source)` would give, without the weights (to render chat prompts early)."""
    import transformers
    kind = model_kind(source)
    path = Path(source).expanduser()
    if kind == 'run' and (path / 'LATEST' / 'policy.pt').is_file():
        from omegaconf import OmegaConf
        tokenizer = load_tokenizer(OmegaConf.load(path / 'config.yaml'))
    elif kind == 'run':
        tokenizer = transformers.AutoTokenizer.from_pretrained(path / 'hf_model')
    else:
        cache_dir = get_local_dir(list(local_dirs))
        name = materialize_model(str(path) if kind != 'hub' else source, cache_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def stop_token_ids(tokenizer, model: Optional[nn.Module] = None) -> List[int]:
    """The ids that end a response: EOS (the tokenizer's and the model's generation config's) and the chat
    template's end-of-turn token, found by rendering one assistant turn and reading the special token that
    follows its text (`<|im_end|>` for SmolLM2, `<|eot_id|>` for Llama 3)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, 'generation_config', None), 'eos_token_id', None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if getattr(tokenizer, 'chat_template', None):
        mark = 'END-OF-TURN-PROBE'
        try:
            text = tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'},
                                                  {'role': 'assistant', 'content': mark}], tokenize=False)
        except Exception:  # a template with rules of its own (roles, system turn): EOS alone then
            text = ''
        if mark in text:
            tail = tokenizer(text[text.rindex(mark) + len(mark):], add_special_tokens=False)['input_ids']
            if tail and tail[0] in set(tokenizer.all_special_ids):
                ids.add(tail[0])
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------------------------------------
# Prompts


def load_prompts(datasets: Sequence[str], split: str, n_prompts: Optional[int], tokenizer=None,
                 cache_dir: Optional[str] = None, dataset_options: Optional[Dict] = None,
                 silent: bool = True) -> List[Prompt]:
    """The first `n_prompts` prompts (None: all) of each data set's `split`, in the split's order (the order
    gold evaluation uses), with the data set's preferred response (sft_target). ValueError naming a data set
    that has no prompts."""
    prompts = []
    for name in datasets:
        loaded, _ = load_source(name, split, silent, cache_dir, tokenizer, dataset_options)
        if not loaded.data:
            raise ValueError(f"datasets: '{name}' has no prompts in its {split} split; pass a data set with "
                             f"prompt/chosen/rejected rows (or another split)")
        items = list(loaded.data.items())[:n_prompts]
        prompts += [Prompt(text, entry['sft_target'], name, loaded.chat_rendered,
                           loaded.prompt_messages(text) if loaded.chat_rendered else None) for text, entry in items]
    return prompts


def response_text(loaded: LoadedModel, prompt: Prompt) -> str:
    """The data set's preferred response as a judge should read it: a chat-rendered one ends with the template's
    end-of-turn text ('Paris.<|im_end|>\\n'), cut here at its first stop token as generated responses are."""
    if not prompt.chat_rendered:
        return prompt.chosen
    ids = encode_texts(loaded.tokenizer, [prompt.chosen], parse_special_tokens=True)[0]
    stop = next((t for t, token in enumerate(ids) if token in loaded.stop_ids), len(ids))
    return loaded.tokenizer.decode(ids[:stop], skip_special_tokens=True)


def encode_prompts(tokenizer, prompts: Sequence[Prompt], max_prompt_length: int) -> List[List[int]]:
    """Token ids of each prompt, no BOS/EOS added, as training tokenizes them (special-token text is plain
    text, except in chat-rendered prompts). A longer HH-format prompt keeps its last max_prompt_length tokens (the
    end of a dialogue, where the question is, as train.py keeps for hh); a longer chat-rendered one is cut inside
    its conversation and rendered again, as in training (preference_datasets.chat_prompt_ids), so that it still
    ends with the template's generation prompt."""
    ids = [None] * len(prompts)
    for chat in (False, True):
        index = [i for i, p in enumerate(prompts) if p.chat_rendered == chat]
        for i, row in zip(index, encode_texts(tokenizer, [prompts[i].text for i in index], parse_special_tokens=chat)):
            if len(row) > max_prompt_length:
                row = (chat_prompt_ids(tokenizer, prompts[i].dialogue, max_prompt_length) if chat
                       else row[-max_prompt_length:])
            ids[i] = row
    return ids


# ----------------------------------------------------------------------------------------------------------
# Generation


def random_state_devices() -> List[int]:
    """The CUDA devices whose random state seeded_random_state forks and seeds: every visible one once CUDA is in use
    (a model split with device_map samples on its last device, and torch.manual_seed would reseed them all), none
    before (nothing can have drawn from them, and asking would start CUDA in a CPU-only run)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


@contextlib.contextmanager
def seeded_random_state(seed: int, devices: Optional[Sequence[int]] = None) -> Iterator[None]:
    """Inside: the global CPU random state and that of each CUDA device of `devices` (default random_state_devices())
    seeded with `seed`; afterwards all of them exactly as they were (torch.random.fork_rng). Each generator is
    seeded directly: torch.manual_seed would also queue a reseed of CUDA devices not yet started, which then happens,
    unforked, whenever CUDA starts."""
    devices = random_state_devices() if devices is None else list(devices)
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(seed)
        yield


def length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices cut into batches of similar length (longest first, ties in order): a batch pads to its own
    longest prompt. Deterministic, so the same inputs give the same batches and the same seeded samples."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> Dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention_mask[i, width - len(r):] = 1
    return {'input_ids': input_ids.to(device), 'attention_mask': attention_mask.to(device)}


# generate() settings that would change the sampling distribution, at the values that switch them off (transformers'
# GenerationMixin._get_logits_processor skips a processor whose setting is None): a model's own generation config
# (SmolLM2's top_k, a Qwen model's repetition_penalty) must not change what is sampled, so that samples are drawn
# from exactly the distribution `sequence_logps` scores them with.
NEUTRAL_PROCESSORS = dict(top_h=None, min_p=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None,
                          repetition_penalty=None, no_repeat_ngram_size=None, sequence_bias=None, bad_words_ids=None,
                          min_length=None, min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
                          exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
                          guidance_scale=None, renormalize_logits=None, watermarking_config=None)


def sampling_kwargs(temperature: float, top_p: float) -> Dict:
    """generate() arguments of one decoding rule: π_T, the softmax of logits / T renormalised over the top-p nucleus
    (temperature 0: greedy), and nothing else (NEUTRAL_PROCESSORS; top_k=0, since transformers' default top_k of 50
    would otherwise apply)."""
    if temperature == 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None, **NEUTRAL_PROCESSORS)
    return dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0, **NEUTRAL_PROCESSORS)


@torch.no_grad()
def generate(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], n: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0, batch_size: int = 16,
             progress: bool = True) -> List[List[Sample]]:
    """n completions of each prompt (greedy at temperature 0, where n > 1 repeats the same text), samples[i][k].

    batch_size counts prompts per generate call (each with its n samples). The global RNGs (CPU and CUDA) are seeded
    with `seed` inside a fork (seeded_random_state), so the caller's random state is left as it was.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = tokenizer.pad_token_id
    samples: List[List[Sample]] = [[] for _ in prompt_ids]
    bar = tqdm.tqdm(total=len(prompt_ids) * n, desc=f'Sampling (T={temperature:g})', unit='sample',
                    disable=not progress, mininterval=1.0)
    with seeded_random_state(seed):
        for batch in length_batches([len(p) for p in prompt_ids], batch_size):
            inputs = left_padded([prompt_ids[i] for i in batch], pad_id, loaded.device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                    eos_token_id=loaded.stop_ids, pad_token_id=pad_id,
                                    **sampling_kwargs(temperature, top_p))
            new_tokens = output[:, inputs['input_ids'].shape[1]:].tolist()
            for row, tokens in enumerate(new_tokens):
                i, k = batch[row // n], row % n
                samples[i].append(completion_sample(tokenizer, tokens, loaded.stop_ids, i, k))
            bar.update(len(new_tokens))
    bar.close()
    return samples


def completion_sample(tokenizer, tokens: List[int], stop_ids: Sequence[int], prompt_index: int,
                      sample_index: int) -> Sample:
    """A Sample from the generated ids of one row: cut after the first stop token (the padding generate()
    adds after a finished row goes with it)."""
    stop = next((t for t, token in enumerate(tokens) if token in stop_ids), None)
    kept = tokens if stop is None else tokens[:stop + 1]
    text = tokenizer.decode(kept if stop is None else kept[:-1], skip_special_tokens=True)
    return Sample(prompt_index, sample_index, text, kept, stop is not None)


def sampled_token_logps(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                        top_p: float = 1.0) -> torch.Tensor:
    """log π_T(token) under the distribution generate() samples from with sampling_kwargs(temperature, top_p), (N,)
    float32, from the (N, V) logits before each token: the softmax of logits / T over the top-p nucleus, computed by
    transformers' own TemperatureLogitsWarper and TopPLogitsWarper as generate() applies them. T = 1, top_p = 1 is
    the model's own log π. T = 0 (greedy) is the point mass on the chosen token: log-probability 0.

    A sampled token was inside the nucleus generate() computed; recomputed logits that differ from generate()'s in
    their last bits could put a token on the nucleus's edge just outside it (−inf), so the sampled token is always
    counted in, with its tempered logit.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    if temperature == 0:
        return torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    scores = logits.float()
    if temperature != 1:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    tempered = scores.gather(1, tokens[:, None])
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores).scatter(1, tokens[:, None], tempered)
    return (tempered.squeeze(1) - scores.logsumexp(-1)).float()


def sequence_logps(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   batch_size: int = 8, temperature: float = 1.0, top_p: float = 1.0) -> List[float]:
    """log π_T(y | x) of each completion, summed over its tokens (its stop token included), under the distribution
    generate(temperature, top_p) samples from (sampled_token_logps); the defaults give log π(y | x) itself."""
    return sequence_logps_per_rule(loaded, prompt_ids, completion_ids, [(temperature, top_p)], batch_size)[0]


@torch.no_grad()
def sequence_logps_per_rule(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]],
                            completion_ids: Sequence[Sequence[int]], rules: Sequence[Tuple[float, float]],
                            batch_size: int = 8) -> List[List[float]]:
    """sequence_logps under each (temperature, top_p) of `rules`, logps[r][i] for rule r and completion i, from one
    teacher-forced forward pass per batch of right-padded prompt + completion rows."""
    model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
    logps = [[] for _ in rules]
    for start in range(0, len(prompt_ids), batch_size):
        prompts, completions = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labelled = torch.zeros_like(input_ids, dtype=torch.bool)  # positions whose next token is a completion token
        for j, (row, p) in enumerate(zip(rows, prompts)):
            input_ids[j, :len(row)] = torch.tensor(row)
            attention_mask[j, :len(row)] = 1
            labelled[j, max(len(p), 1) - 1:len(row) - 1] = True  # a first token without context is not scored
        logits = model(input_ids.to(loaded.device), attention_mask=attention_mask.to(loaded.device),
                       use_cache=False).logits
        labelled = labelled.to(logits.device)
        tokens = input_ids.to(logits.device).roll(-1, dims=1)[labelled]
        owner = torch.arange(len(rows), device=logits.device)[:, None].expand_as(labelled)[labelled]
        for r, (temperature, top_p) in enumerate(rules):
            token_logps = sampled_token_logps(logits[labelled], tokens, temperature, top_p)
            logps[r] += torch.zeros(len(rows), device=logits.device).index_add_(0, owner, token_logps).tolist()
    return logps


def sample_rows(prompts: Sequence[Prompt], samples: Sequence[Sequence[Sample]], **extra) -> List[Dict]:
    """JSON-ready rows, one per sample: prompt, completion, tokens generated, whether it stopped, plus `extra`."""
    return [{**extra, 'prompt_index': s.prompt_index, 'sample_index': s.sample_index, 'dataset': prompts[i].dataset,
             'prompt': prompts[i].text, 'completion': s.completion, 'n_tokens': len(s.completion_ids),
             'stopped': s.stopped}
            for i, row in enumerate(samples) for s in row]


def write_jsonl(path, rows: Iterable[Dict]) -> None:
    """Rows as JSON lines, written atomically."""
    atomic_write_text(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


# ----- samples during training (BasicTrainer.log_samples) ------------------------------------------

@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, batch: Dict, max_length: int, do_sample: bool, dp_rank: int,
                   dp_size: int) -> List[str]:
    """Decoded continuations (prompt included) of a local batch's prompts, gathered from all data-parallel ranks."""
    output = model.generate(batch['prompt_input_ids'], attention_mask=batch['prompt_attention_mask'],
                            max_length=max_length, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                            # sharded models: every rank runs each step until all ranks are done
                            synced_gpus=dp_size > 1)
    output = pad_to_length(output, max_length, tokenizer.pad_token_id)
    return tokenizer.batch_decode(all_gather_if_needed(output, dp_rank, dp_size), skip_special_tokens=True)


def draw_samples(batches: Sequence[Dict], samplers: Dict[str, Callable[[Dict], List[str]]], seed: int
                 ) -> Tuple[List[str], Dict[str, List[str]]]:
    """The prompts of `batches` and, under each name of `samplers`, that sampler's texts for them, batch by batch
    in the samplers' order: sampler(batch) -> one decoded text per prompt (`generate_texts`).

    Sampling draws from the global RNGs, CPU and CUDA; both are forked and seeded with `seed` here
    (seeded_random_state), so samples drawn during evaluation depend only on the seed and the step, and never shift
    the training stream (LoRA dropout on a GPU draws from the CUDA one).
    """
    prompts, samples = [], {name: [] for name in samplers}
    with seeded_random_state(seed):
        for batch in batches:
            prompts.extend(batch['prompt'])
            for name, sample in samplers.items():
                samples[name].extend(sample(batch))
    return prompts, samples


def print_samples(samples: Dict[str, List[str]]) -> None:
    """The first 4 texts of each list of `samples` (name 'policy_samples' -> 'policy samples:'), on rank 0."""
    for name, texts in samples.items():
        rank0_print(f'{name.replace("_", " ")}:\n' + json.dumps(texts[:4], indent=2))


def log_sample_tables(wandb_run, step: int, prompts: List[str], samples: Dict[str, List[str]]) -> None:
    """One wandb table (step, prompt, sample) per non-empty list of `samples`; nothing without wandb."""
    if isinstance(wandb_run, DummyWandb):
        return
    import wandb
    for name, texts in samples.items():
        if texts:
            table = wandb.Table(columns=['step', 'prompt', 'sample'], data=[[step, p, s] for p, s in zip(prompts, texts)])
            wandb_run.log({name: table}, step=step)
