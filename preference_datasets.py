"""Preference data: raw rows -> {prompt: {responses, pairs, sft_target}} -> tokenized, padded batches.

Usage (the trainer does the second step; the first is for inspecting data):

    from transformers import AutoTokenizer
    from preference_datasets import get_dataset, get_batch_iterator, padding_fraction

    data = get_dataset('hh', 'test')                                   # Anthropic/hh-rlhf from the Hub
    data = get_dataset('hh:/data/hh-rlhf', 'train')                    # same schema, local train.jsonl.gz
    data = get_dataset('trl-lib/ultrafeedback_binarized', 'test', tokenizer=tok)   # generic format

    tok = AutoTokenizer.from_pretrained('EleutherAI/pythia-2.8b')
    for batch in get_batch_iterator(['hh', 'shp'], tok, split='train', batch_size=64, n_epochs=1):
        batch['chosen_input_ids']          # (64, T) right-padded; prompt_* are left-padded
        padding_fraction(batch)            # share of the policy's forward pass that is padding

Dataset names (`get_dataset(name, ...)`, one entry of `names` in `get_batch_iterator`):

    hh, shp, se           Anthropic/hh-rlhf, stanfordnlp/SHP, HuggingFaceH4/stack-exchange-preferences
    hh:PATH, shp:PATH, se:PATH
                          the same upstream schema read from local files: PATH is a directory holding
                          train.* and test.* (.jsonl, .json, .parquet, the first two optionally .gz), or
                          one such file, split deterministically (seed 42) into train and test
    anything else         a Hub id (owner/name) or a local path in the generic preference format:
                          columns prompt, chosen, rejected, either strings or message lists

Every prompt of the HH-style forms (hh, shp, se, generic string form) starts with '\\n\\nHuman:' and ends
with '\\n\\nAssistant:'. The generic message form is rendered with the tokenizer's chat template instead:
the prompt is `apply_chat_template(prompt_messages, add_generation_prompt=True)` (e.g. ends with
'<|im_start|>assistant\\n') and a response is the rest of the rendered conversation (e.g.
'Hi!<|im_end|>\\n'); there the chat template's special tokens are control tokens, everywhere else
special-token text in the data (a literal '<|endoftext|>') is tokenized as plain text. A tokenized response
ends with EOS, except one the template closed with its own end-of-turn token: it ends at that token
('Hi!<|im_end|>', one end-of-turn, where generation stops). `dataset_options={'render_hh_with_chat_template':
True}` renders the HH-style forms through the chat template too (user/assistant messages), for instruct models.

The readers of every source live in data_sources.py (to add one, see its docstring); this file turns their rows
into tokenized, cached, padded batches.

Tokenized examples are cached on disk (under `cache_dir`, default ~/.cache/beta_dpo/tokenized), keyed by
the data's identity, the tokenizer and the length settings, so a second run neither loads nor tokenizes.
"""
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import tqdm

from checkpoints import DiskFullError, save_atomically, unreadable_because
from chat_format import Messages, closed_turn, special_token_texts
from data_sources import DataWarning, PreferenceData, load_source, resolve_name, split_file
from utils import UserError, file_identity, first_fit, fingerprint, get_local_dir

# 2: chat-rendered responses end at their end-of-turn token (no EOS after it); 3: a too long chat prompt is cut
# inside its conversation and rendered again (chat_prompt_ids), so it keeps its generation prompt
CACHE_VERSION = 3
# No tokenizer we know has tokens of more than about 20 characters; texts are cut to this many
# characters per token of max_length before tokenizing (see tokenize_split).
MAX_CHARS_PER_TOKEN = 64
# What stands for the middle of a message cut to fit max_prompt_length (chat_prompt_ids).
ELISION = ' [...] '


def get_dataset(name: str, split: str, silent: bool = False, cache_dir: Optional[str] = None, tokenizer=None,
                dataset_options: Optional[Mapping[str, Any]] = None) -> PreferenceData:
    """{prompt: {'responses': [str], 'pairs': [(i_preferred, i_dispreferred)], 'sft_target': str}} of one split.

    name: see the module docstring ('hh', 'shp:PATH', a Hub id, ...). tokenizer: needed only for the
    generic conversational form (its chat template). dataset_options: passed to the loader
    (`test_fraction` of a single local file, `load_dataset_kwargs` for the Hub, a new source's settings).
    """
    return load_source(name, split, silent, cache_dir, tokenizer, dataset_options)[0].data


# ----------------------------------------------------------------------------------------------------------
# Tokenization and its disk cache


def truncate_pair(prompt: List[int], chosen: List[int], rejected: List[int], truncation_mode: str,
                  max_length: int, max_prompt_length: int, shorter_prompt: Optional[Callable[[], List[int]]] = None
                  ) -> Tuple[List[int], List[int], List[int]]:
    """The original's truncation of one (prompt, chosen + EOS, rejected + EOS) triple of token ids.

    If prompt + the longer response exceeds max_length, the prompt is cut to max_prompt_length (its end
    kept for 'keep_end', its start for 'keep_start'; a chat-rendered prompt is instead replaced by
    shorter_prompt(), its conversation cut and rendered again within max_prompt_length tokens, see
    chat_prompt_ids); if that is still too long, both responses are cut to max_length - max_prompt_length
    tokens (which can drop their EOS, as in the original).
    """
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        if shorter_prompt is not None:
            prompt = shorter_prompt()
        elif truncation_mode == 'keep_start':
            prompt = prompt[:max_prompt_length]
        elif truncation_mode == 'keep_end':
            prompt = prompt[-max_prompt_length:]
        else:
            raise ValueError(f"Unknown truncation mode '{truncation_mode}'; expected 'keep_start' or 'keep_end'")
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[:max_length - max_prompt_length], rejected[:max_length - max_prompt_length]
    return prompt, chosen, rejected


def chat_prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]], max_prompt_length: int) -> List[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template with its generation prompt, in at most
    max_prompt_length tokens. A longer conversation is cut inside and rendered again, so that it still ends with
    the generation prompt ('<|im_start|>assistant\\n' for SmolLM2) the response follows; cutting its tokens at
    either end (keep_start) would leave the response after half a user message.

    First the oldest turns go, a whole exchange at a time (what is left still opens with a user message, which
    templates that check the roles require), down to the last message; a system message at the start stays, and
    so does a template's own default one (SmolLM2's, which it writes whenever the messages have none). If that is
    still too long, the longest message loses its middle: its first and last tokens stay, joined by ELISION; then
    the next longest, and so on. A conversation that fits is rendered exactly as the data loader renders it.
    UserError when even empty messages do not fit (the template's own text is longer than max_prompt_length).
    """
    limit = max_prompt_length * MAX_CHARS_PER_TOKEN  # as in tokenize_split: more text than that cannot fit anyway
    messages = [{**m, 'content': m['content'] if len(m['content']) <= 2 * limit else
                 m['content'][:limit] + ELISION + m['content'][-limit:]} for m in messages]
    ids = _rendered_ids(tokenizer, messages)
    system, turns = (messages[:1], messages[1:]) if messages and messages[0]['role'] == 'system' else ([], messages)
    while len(ids) > max_prompt_length and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]['role'] != 'user':
            turns = turns[1:]
        ids = _rendered_ids(tokenizer, system + turns)
    return _middles_cut(tokenizer, system + turns, ids, max_prompt_length) if len(ids) > max_prompt_length else ids


def _rendered_ids(tokenizer, messages: Messages) -> List[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode_texts(tokenizer, [text], parse_special_tokens=True)[0]


def _middles_cut(tokenizer, messages: Messages, ids: List[int], max_prompt_length: int) -> List[int]:
    """chat_prompt_ids' second step: the longest message's middle cut out until the rendering fits."""
    originals = [m['content'] for m in messages]
    offsets = [tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                         return_offsets_mapping=True)['offset_mapping'] for text in originals]
    kept = [len(o) for o in offsets]  # tokens of each message's text that stay
    elision = len(encode_texts(tokenizer, [ELISION])[0])
    messages = list(messages)
    while len(ids) > max_prompt_length:
        i = max(range(len(kept)), key=kept.__getitem__)  # the first of the longest
        if kept[i] == 0:
            raise UserError(f'max_prompt_length={max_prompt_length} is shorter than the chat template\'s own text '
                            f'({len(ids)} tokens with every message emptied): raise max_prompt_length')
        excess = len(ids) - max_prompt_length + (elision if kept[i] == len(offsets[i]) else 0)
        kept[i] = max(0, kept[i] - excess)
        head, tail = (kept[i] + 1) // 2, kept[i] // 2
        text, spans = originals[i], offsets[i]
        cut = text[:spans[head - 1][1]] + ELISION + (text[spans[len(spans) - tail][0]:] if tail else '') if head else ''
        messages[i] = {**messages[i], 'content': cut}
        ids = _rendered_ids(tokenizer, messages)
    return ids


def encode_texts(tokenizer, texts: List[str], parse_special_tokens: bool = False, silent: bool = True,
                 chunk_size: int = 4096) -> List[List[int]]:
    """Token ids of each text, no BOS/EOS added, in batches (the fast tokenizer runs them in parallel).

    Unless parse_special_tokens, special-token text in the data ('<|endoftext|>') is tokenized as the
    plain text it is (split_special_tokens=True); the original asserts and stops on such a row instead.
    """
    ids: List[List[int]] = []
    for start in tqdm.trange(0, len(texts), chunk_size, desc='Tokenizing', disable=silent or len(texts) <= chunk_size):
        ids.extend(tokenizer(texts[start:start + chunk_size], add_special_tokens=False, split_special_tokens=not parse_special_tokens,
                             return_attention_mask=False, return_token_type_ids=False)['input_ids'])
    return ids


class Ragged(NamedTuple):
    """Variable-length int sequences in one flat array: sequence i is values[offsets[i]:offsets[i + 1]]."""
    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lists(cls, lists: List[List[int]]) -> 'Ragged':
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        values = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(values, offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class TokenizedSplit:
    """One data set split's examples, tokenized and truncated, grouped by prompt: what the disk cache holds.

    An example is one (prompt, pair) in DPO mode, one (prompt, sft_target) in SFT mode (then `rejected_*`
    are empty). The examples of prompt g are group_offsets[g]:group_offsets[g + 1].
    """
    prompts: List[str]
    responses: List[str]
    group_offsets: np.ndarray       # (n_prompts + 1,)
    chosen_response: np.ndarray     # (n_examples,) index into responses
    rejected_response: np.ndarray   # (n_examples,) index into responses, -1 in SFT mode
    prompt_ids: Ragged              # per example, after truncation
    chosen_ids: Ragged              # response tokens only, ending with EOS or the chat template's end-of-turn, before truncation
    rejected_ids: Ragged

    @property
    def n_examples(self) -> int:
        return len(self.chosen_response)

    def example_lengths(self, sft_mode: bool) -> np.ndarray:
        """(n_examples,) tokens of each example's longest row: prompt + the longer of its responses."""
        responses = np.diff(self.chosen_ids.offsets)
        if not sft_mode:
            responses = np.maximum(responses, np.diff(self.rejected_ids.offsets))
        return np.diff(self.prompt_ids.offsets) + responses

    def example(self, e: int, prompt_index: int, sft_mode: bool) -> Dict[str, Any]:
        example = {'prompt': self.prompts[prompt_index], 'chosen_response_only': self.responses[self.chosen_response[e]],
                   'prompt_ids': self.prompt_ids[e], 'chosen_ids': self.chosen_ids[e]}
        if not sft_mode:
            example.update(rejected_response_only=self.responses[self.rejected_response[e]], rejected_ids=self.rejected_ids[e])
        return example

    def state_dict(self) -> Dict[str, Any]:
        arrays = {'group_offsets': self.group_offsets, 'chosen_response': self.chosen_response,
                  'rejected_response': self.rejected_response}
        for name in ('prompt_ids', 'chosen_ids', 'rejected_ids'):
            ragged = getattr(self, name)
            arrays[f'{name}.values'], arrays[f'{name}.offsets'] = ragged.values, ragged.offsets
        return {'version': CACHE_VERSION, 'prompts': self.prompts, 'responses': self.responses,
                **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> 'TokenizedSplit':
        if state.get('version') != CACHE_VERSION:
            raise ValueError(f"cache version {state.get('version')}, expected {CACHE_VERSION}")
        ragged = {name: Ragged(state[f'{name}.values'].numpy(), state[f'{name}.offsets'].numpy())
                  for name in ('prompt_ids', 'chosen_ids', 'rejected_ids')}
        split = cls(state['prompts'], state['responses'], state['group_offsets'].numpy(),
                    state['chosen_response'].numpy(), state['rejected_response'].numpy(), **ragged)
        split.check()
        return split

    def check(self) -> None:
        """ValueError unless every index and offset points inside its array (a cache read back whole but wrong)."""
        n = self.n_examples
        def monotone(offsets, length, total, what):
            if len(offsets) != length + 1 or offsets[0] != 0 or offsets[-1] != total or (np.diff(offsets) < 0).any():
                raise ValueError(f'{what} offsets do not fit their {length} entries and {total} values')
        monotone(self.group_offsets, len(self.prompts), n, 'prompt group')
        for name in ('prompt_ids', 'chosen_ids', 'rejected_ids'):
            ragged = getattr(self, name)
            length = 0 if name == 'rejected_ids' and len(ragged.offsets) == 1 else n
            monotone(ragged.offsets, length, len(ragged.values), name)
        responses = np.concatenate([self.chosen_response, self.rejected_response])
        if len(self.rejected_response) != n or (responses < -1).any() or (responses >= len(self.responses)).any() \
                or (self.chosen_response < 0).any():
            raise ValueError(f'response indices outside the {len(self.responses)} responses')


def tokenize_split(data: PreferenceData, tokenizer, truncation_mode: str, max_length: int, max_prompt_length: int,
                   sft_mode: bool = False, chat_rendered: bool = False, silent: bool = True,
                   messages: Optional[Mapping[str, Messages]] = None) -> TokenizedSplit:
    """Every example of `data` tokenized: unique prompts and responses in batches, then truncated per pair.

    chat_rendered: the texts came out of the chat template, and `messages` holds each prompt's messages (a too
    long prompt is rendered again from them within max_prompt_length, see chat_prompt_ids)."""
    assert not chat_rendered or messages is not None, "a chat-rendered split needs the messages of its prompts"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f'tokenizer {tokenizer.name_or_path!r} has no EOS token; the responses need one appended')
    prompts = list(data)
    response_index: Dict[str, int] = {}
    examples: List[Tuple[int, int, int]] = []  # (prompt, chosen response, rejected response)
    group_offsets = [0]
    index = lambda text: response_index.setdefault(text, len(response_index))
    for g, prompt in enumerate(prompts):
        entry = data[prompt]
        if sft_mode:
            examples.append((g, index(entry['sft_target']), -1))
        else:
            examples.extend((g, index(entry['responses'][i]), index(entry['responses'][j])) for i, j in entry['pairs'])
        group_offsets.append(len(examples))
    responses = list(response_index)
    # An enormous row (a broken file, a pasted log) would take minutes and gigabytes to tokenize only to be
    # cut to max_length tokens: cut its text first, on the side truncate_pair drops, to MAX_CHARS_PER_TOKEN
    # characters per token allowed, which leaves at least max_length tokens, so the result is unchanged.
    limit = max_length * MAX_CHARS_PER_TOKEN
    keep_prompt = (lambda t: t[-limit:]) if truncation_mode == 'keep_end' else (lambda t: t[:limit])
    prompt_tokens = encode_texts(tokenizer, [keep_prompt(p) for p in prompts], chat_rendered, silent)
    texts = [r[:limit] for r in responses]
    # EOS ends every response, as in the original, unless a chat template already closed it with its own
    # end-of-turn token ('Paris.<|im_end|>\n'): then the response ends there, with exactly one end-of-turn
    # (SmolLM2's EOS is <|im_end|> itself; appending EOS trained on '<|im_end|>\n<|im_end|>').
    specials = special_token_texts(tokenizer) if chat_rendered else []
    closed = [closed_turn(t, specials) if chat_rendered else None for t in texts]
    response_tokens = [ids if c is not None else ids + [eos] for ids, c in
                       zip(encode_texts(tokenizer, [c if c is not None else t for t, c in zip(texts, closed)],
                                        chat_rendered, silent), closed)]
    shortened: Dict[int, List[int]] = {}  # a too long chat prompt, rendered again once for all its pairs

    def shorter_prompt(g: int) -> List[int]:
        if g not in shortened:
            shortened[g] = chat_prompt_ids(tokenizer, messages[prompts[g]], max_prompt_length)
        return shortened[g]
    truncated = [truncate_pair(prompt_tokens[g], response_tokens[c], response_tokens[c if r < 0 else r],
                               truncation_mode, max_length, max_prompt_length,
                               (lambda g=g: shorter_prompt(g)) if chat_rendered else None) for g, c, r in examples]
    return TokenizedSplit(
        prompts, responses, np.asarray(group_offsets, dtype=np.int64),
        np.asarray([c for _, c, _ in examples], dtype=np.int64), np.asarray([r for _, _, r in examples], dtype=np.int64),
        Ragged.from_lists([p for p, _, _ in truncated]), Ragged.from_lists([c for _, c, _ in truncated]),
        Ragged.from_lists([] if sft_mode else [r for _, _, r in truncated]))


def tokenizer_identity(tokenizer) -> str:
    """name_or_path + a hash of everything that decides the ids: vocabulary, merges, normalizer,
    pre-tokenizer and special tokens (the fast tokenizer's JSON), the chat template and the EOS id."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return f'{tokenizer.name_or_path}:{fingerprint(vocab, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, length=20)}'


def data_identity(name: str, split: str, dataset_options: Optional[Mapping[str, Any]] = None) -> List[Any]:
    """What identifies a split's data without loading it: the file read (path, size, mtime) or the Hub id."""
    key, _, location = resolve_name(name)
    train_pairs = (dataset_options or {}).get('synthetic', {}).get('train_pairs')
    if key == 'synthetic' and split == 'train' and train_pairs is not None:
        location, split = train_pairs, None  # the pairs file replaces the generated training pairs
    if location is not None and Path(location).expanduser().exists():
        path = Path(location).expanduser() if split is None else split_file(location, split)[0]
        return file_identity(path)
    return [location]  # a Hub id, None for a registered source's Hub data set


def cache_path(name: str, split: str, tokenizer, max_length: int, max_prompt_length: int, sft_mode: bool,
               cache_dir: Optional[str], dataset_options: Mapping[str, Any]) -> Path:
    """Where the tokenized split lives: a hash of the data, tokenizer and length settings."""
    key_source, source, _ = resolve_name(name)
    key = fingerprint(CACHE_VERSION, source.version, name, key_source, split, data_identity(name, split, dataset_options),
                      tokenizer_identity(tokenizer), max_length, max_prompt_length, source.truncation_mode, sft_mode,
                      dataset_options)
    root = Path(cache_dir).expanduser() / 'beta_dpo' if cache_dir else Path('~/.cache/beta_dpo').expanduser()
    slug = re.sub(r'[^\w.-]+', '_', name)[-40:]
    return root / 'tokenized' / f'{slug}-{split}-{"sft" if sft_mode else "dpo"}-{key}.pt'


def load_tokenized(name: str, tokenizer, split: str = 'train', max_length: int = 512, max_prompt_length: int = 128,
                   sft_mode: bool = False, silent: bool = False, cache_dir: Optional[str] = None,
                   dataset_options: Optional[Mapping[str, Any]] = None) -> TokenizedSplit:
    """One data set's tokenized split: from the disk cache, else loaded, tokenized and cached."""
    dataset_options = dict(dataset_options or {})
    path = cache_path(name, split, tokenizer, max_length, max_prompt_length, sft_mode, cache_dir, dataset_options)
    if path.exists():
        try:
            tokenized = TokenizedSplit.from_state_dict(torch.load(path, weights_only=True))
            if not silent:
                print(f'{name} ({split}): {tokenized.n_examples} tokenized examples from the cache {path}')
            return tokenized
        except Exception as e:  # any damage (truncated, garbage, old layout) means: rebuild it
            warnings.warn(f'{path}: unreadable tokenization cache ({unreadable_because(e)}); rebuilding it', DataWarning)
    loaded, source = load_source(name, split, silent, cache_dir, tokenizer, dataset_options)
    tokenized = tokenize_split(loaded.data, tokenizer, source.truncation_mode, max_length, max_prompt_length,
                               sft_mode, loaded.chat_rendered, silent, loaded.messages)
    try:
        save_atomically(tokenized.state_dict(), path)
    except DiskFullError as e:  # the run goes on; only the next run's head start is lost
        warnings.warn(f'{e}\nContinuing without caching {name} ({split}): a later run tokenizes it again.', DataWarning)
    return tokenized


# ----------------------------------------------------------------------------------------------------------
# Batches


def pad_token_id(tokenizer) -> int:
    """The id used to pad input_ids; EOS where the tokenizer has no pad token (as the original's train.py sets it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _padded(sequences: List[np.ndarray], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if left:
            out[i, width - len(s):] = torch.from_numpy(s)
        else:
            out[i, :len(s)] = torch.from_numpy(s)
    return out


def collate(examples: List[Dict[str, Any]], pad_id: int) -> Dict[str, Union[List[str], torch.Tensor]]:
    """The original's batch: strings as lists; prompt tensors left-padded, the rest right-padded with
    pad_id (input_ids), 0 (attention_mask) or -100 (labels); labels are -100 on the prompt tokens."""
    batch: Dict[str, Union[List[str], torch.Tensor]] = {'prompt': [ex['prompt'] for ex in examples]}
    kinds = ['chosen', 'rejected'] if 'rejected_ids' in examples[0] else ['chosen']
    for kind in kinds:
        batch[kind] = [ex['prompt'] + ex[f'{kind}_response_only'] for ex in examples]
        batch[f'{kind}_response_only'] = [ex[f'{kind}_response_only'] for ex in examples]
    prompts = [ex['prompt_ids'].astype(np.int64) for ex in examples]
    for kind in kinds:
        responses = [ex[f'{kind}_ids'].astype(np.int64) for ex in examples]
        sequences = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
        batch[f'{kind}_input_ids'] = _padded(sequences, pad_id)
        batch[f'{kind}_attention_mask'] = _padded([np.ones_like(s) for s in sequences], 0)
        batch[f'{kind}_labels'] = _padded([np.concatenate([np.full_like(p, -100), r]) for p, r in zip(prompts, responses)], -100)
    batch['prompt_input_ids'] = _padded(prompts, pad_id, left=True)
    batch['prompt_attention_mask'] = _padded([np.ones_like(p) for p in prompts], 0, left=True)
    return batch


def mismatched_partners(n: int) -> List[int]:
    """KTO's mismatched pairing of a microbatch of n ≥ 2 pairs: pair i takes the completion of pair i XOR 1 (neighbours
    swap), and in an odd microbatch the last pair takes the first's. TRL 1.16 rotates the completions by one over the
    batch instead; swapping neighbours gives every data-parallel split of a batch into even slices the same
    mismatched pairs (the same z0 under FSDPTrainer as under BasicTrainer), and both are draws of the same estimate."""
    if n < 2:
        raise ValueError('KTO\'s mismatched pairs need at least 2 pairs per microbatch')
    return [i ^ 1 if (i ^ 1) < n else 0 for i in range(n)]


def mismatched_batch(batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """KTO's mismatched (prompt, completion) sequences of a collated microbatch (`collate`): prompt i followed by the
    chosen completion of pair `mismatched_partners(n)[i]`, as (n, width) input_ids, attention_mask and labels (−100 on
    the prompt and the padding), right-padded; at most as wide as the batch's chosen sequences (a longer mismatched
    completion is cut at the end), on the batch's device."""
    ids, mask, labels = batch['chosen_input_ids'], batch['chosen_attention_mask'], batch['chosen_labels']
    n, width = ids.shape
    rows = []
    for i, j in enumerate(mismatched_partners(n)):
        prompt = ids[i][(mask[i] == 1) & (labels[i] == -100)]
        completion = ids[j][labels[j] != -100][:max(1, width - prompt.numel())]
        rows.append((prompt, completion))
    width = max(p.numel() + c.numel() for p, c in rows)
    out_ids = torch.zeros(n, width, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros(n, width, dtype=mask.dtype, device=ids.device)
    out_labels = torch.full((n, width), -100, dtype=labels.dtype, device=ids.device)
    for i, (prompt, completion) in enumerate(rows):
        length = prompt.numel() + completion.numel()
        out_ids[i, :length] = torch.cat([prompt, completion])
        out_mask[i, :length] = 1
        out_labels[i, prompt.numel():length] = completion
    return {'input_ids': out_ids, 'attention_mask': out_mask, 'labels': out_labels}


def padding_counts(batch: Mapping[str, Any], row_tokens: Optional[int] = None) -> Tuple[int, int]:
    """(padding tokens, tokens computed) of the policy's forward pass over `batch`: chosen and rejected run together,
    padded to the longer of the two (the original's concatenated_inputs), 2B rows of that width; with row_tokens
    (padding_free=true), their sequences packed first fit into rows of at most row_tokens tokens
    (logps.pack_sequences), padded to the longest row."""
    masks = [batch[k] for k in ('chosen_attention_mask', 'rejected_attention_mask') if k in batch]
    lengths = [int(n) for m in masks for n in m.sum(-1)]
    if row_tokens:
        rows = first_fit(lengths, row_tokens)
        total = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
    else:
        total = len(lengths) * max(m.shape[1] for m in masks)
    return total - sum(lengths), total


def padding_fraction(batch: Mapping[str, Any], row_tokens: Optional[int] = None) -> float:
    """Share of the policy's forward pass over `batch` that is padding (`padding_counts`: padded, or packed into rows
    of row_tokens)."""
    padding, total = padding_counts(batch, row_tokens)
    return padding / total


def epoch_order(group_sizes: np.ndarray, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Example indices of one epoch: prompts in a seeded per-epoch permutation, each prompt's examples together."""
    groups = np.random.default_rng([seed, epoch]).permutation(len(group_sizes)) if shuffle else np.arange(len(group_sizes))
    sizes = group_sizes[groups]
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])[groups]
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(starts, sizes) + within


def bucket_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, window: int, seed) -> np.ndarray:
    """`order` (whole batches) regrouped so that each batch holds examples of similar length: the examples of
    every `window` consecutive batches are sorted by length, cut into batches again, and those batches put in a
    random order (seeded by `seed`). A permutation of `order`: an epoch holds the same examples, each within
    `window` batches of where it was, and a batch pads to its own longest row, so it pads less."""
    rng = np.random.default_rng(seed)
    span = window * batch_size
    regrouped = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk_batches = chunk[np.argsort(lengths[chunk], kind='stable')].reshape(-1, batch_size)
        regrouped.append(chunk_batches[rng.permutation(len(chunk_batches))].reshape(-1))
    return np.concatenate(regrouped) if regrouped else order


def get_batch_iterator(names: List[str],
                       tokenizer,
                       split: str = 'train',
                       batch_size: int = 1,
                       shuffle: bool = True,
                       max_length: int = 512,
                       max_prompt_length: int = 128,
                       sft_mode: bool = False,
                       n_epochs: Optional[int] = None,
                       n_examples: Optional[int] = None,
                       seed: int = 0,
                       silent: bool = False,
                       cache_dir: Optional[str] = None,
                       start_example: int = 0,
                       dataset_options: Optional[Mapping[str, Any]] = None,
                       bucket_batches: Optional[int] = None) -> Iterator[Dict]:
    """Batches of the given data sets, mixed. Stops after n_epochs or n_examples, whichever comes first.

    As the original: an example is a (prompt, pair), or in sft_mode a (prompt, sft_target) yielding only
    prompt*/chosen* keys; each epoch shuffles the prompts (with a permutation seeded by (seed, epoch)) and
    drops its last partial batch; n_examples counts yielded examples and is checked after each batch.
    The stream is the same for the same seed. start_example=k skips the first k examples of that stream
    (counted towards n_examples) by arithmetic, without collating them; the examples after k are those of
    an unskipped run, in whole batches from k (for k a multiple of batch_size, the same batches).
    Tokenization covers whole splits once and is cached (see load_tokenized).

    bucket_batches=B: each epoch's order is regrouped by length in windows of B batches (bucket_by_length), so
    batches pad less; the stream is still a function of the seed, and start_example works the same way.
    """
    if n_epochs is None and n_examples is None:
        raise ValueError('get_batch_iterator: give n_epochs or n_examples (or both: it stops at the first)')
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f'need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}')
    if batch_size < 1 or start_example < 0:
        raise ValueError(f'need batch_size >= 1 and start_example >= 0, got {batch_size} and {start_example}')
    if bucket_batches is not None and not (isinstance(bucket_batches, int) and bucket_batches > 0):
        raise ValueError(f'bucket_batches={bucket_batches!r} must be a positive integer or None')
    names = [names] if isinstance(names, str) else list(names)
    parts = [load_tokenized(name, tokenizer, split, max_length, max_prompt_length, sft_mode, silent, cache_dir, dataset_options)
             for name in names]
    part_starts = np.cumsum([0] + [p.n_examples for p in parts])
    group_sizes = np.concatenate([np.diff(p.group_offsets) for p in parts])
    prompt_of = np.concatenate([np.repeat(np.arange(len(p.prompts)), np.diff(p.group_offsets)) for p in parts])
    epoch_length = int(part_starts[-1]) // batch_size * batch_size
    if epoch_length == 0:
        raise ValueError(f'{names} ({split}): {int(part_starts[-1])} examples, fewer than one batch of {batch_size}')
    pad_id = pad_token_id(tokenizer)
    lengths = np.concatenate([p.example_lengths(sft_mode) for p in parts]) if bucket_batches else None

    def example(i: int) -> Dict[str, Any]:
        k = int(np.searchsorted(part_starts, i, side='right')) - 1
        return parts[k].example(i - int(part_starts[k]), int(prompt_of[i]), sft_mode)

    epoch, offset = divmod(start_example, epoch_length)
    n_seen, pending = start_example, []
    while (n_epochs is None or epoch < n_epochs) and (n_examples is None or n_seen < n_examples):
        order = epoch_order(group_sizes, shuffle, seed, epoch)[:epoch_length]
        if bucket_batches:
            order = bucket_by_length(order, lengths, batch_size, bucket_batches, [seed, epoch, 1])
        for i in order[offset:]:
            pending.append(int(i))
            if len(pending) == batch_size:
                yield collate([example(j) for j in pending], pad_id)
                n_seen, pending = n_seen + batch_size, []
                if n_examples is not None and n_seen >= n_examples:
                    break
        epoch, offset = epoch + 1, 0
    if not silent:
        print(f'Finished {n_seen} examples ({epoch} epochs) on the {split} split')


def dataset_options(config) -> Dict:
    """Options the data loaders read from a run's config (render_hh_with_chat_template, the synthetic block); plain dict."""
    from omegaconf import OmegaConf
    options = {'render_hh_with_chat_template': True} if config.render_hh_with_chat_template else {}
    return {**options, **({'synthetic': OmegaConf.to_container(config.synthetic, resolve=True)} if 'synthetic' in config else {})}


def batch_iterator_kwargs(config, tokenizer, sft_mode: bool, silent: bool) -> Dict:
    """The arguments of `get_batch_iterator` that a run's config fixes for every split (data sets, lengths, data
    options, cache directory): a trainer adds split, batch_size, seed and n_epochs / n_examples."""
    return dict(names=list(config.datasets), tokenizer=tokenizer, shuffle=True, max_length=config.max_length,
                max_prompt_length=config.max_prompt_length, sft_mode=sft_mode, silent=silent,
                cache_dir=get_local_dir(config.local_dirs), dataset_options=dataset_options(config))
