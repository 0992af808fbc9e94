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

To add a source (e.g. a generated `synthetic` task): write `load_synthetic(request: LoadRequest) -> Loaded`
and add one line to `SOURCES`; `dataset_options` reaches it as `request.options`.

Tokenized examples are cached on disk (under `cache_dir`, default ~/.cache/beta_dpo/tokenized), keyed by
the data's identity, the tokenizer and the length settings, so a second run neither loads nor tokenizes.
"""
import gzip
import html.parser
import io
import json
import re
import warnings
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import tqdm

from checkpoints import DiskFullError, save_atomically, unreadable_because
from synthetic_task import (describe_synthetic, synthetic_gold_answer, synthetic_options, synthetic_pair,
                            synthetic_prompts)
from utils import ASSISTANT, HUMAN, file_identity, fingerprint, get_local_dir

PreferenceData = Dict[str, Dict[str, Union[List[str], List[Tuple[int, int]], str]]]

# A local file given as the whole data set is split this way; 1% test is what the original does for `se`.
SPLIT_SEED = 42
TEST_FRACTION = 0.01
# A file where more rows than this are malformed is almost surely in the wrong format: stop rather than warn.
MAX_MALFORMED_FRACTION = 0.5
FILE_EXTENSIONS = ('.jsonl', '.jsonl.gz', '.json', '.json.gz', '.parquet')
CACHE_VERSION = 2  # 2: chat-rendered responses end at their end-of-turn token (no EOS after it)
# No tokenizer we know has tokens of more than about 20 characters; texts are cut to this many
# characters per token of max_length before tokenizing (see tokenize_split).
MAX_CHARS_PER_TOKEN = 64


class DataWarning(UserWarning):
    """Rows left out of a data set (a few malformed or inconsistent rows)."""


# ----------------------------------------------------------------------------------------------------------
# Reading local files


def split_file(location: str, split: str) -> Tuple[Path, bool]:
    """The file holding `split` at `location`, and whether it still needs the deterministic train/test split."""
    path = Path(location).expanduser()
    if path.is_dir():
        found = [path / f'{split}{ext}' for ext in FILE_EXTENSIONS if (path / f'{split}{ext}').is_file()]
        if not found:
            expected = ', '.join(f'{split}{ext}' for ext in FILE_EXTENSIONS)
            raise FileNotFoundError(f"{path}: no file for the '{split}' split; expected one of {expected}")
        if len(found) > 1:
            raise ValueError(f"{path}: several files for the '{split}' split ({', '.join(p.name for p in found)}); keep one")
        return found[0], False
    if path.is_file():
        if not path.name.endswith(FILE_EXTENSIONS):
            raise ValueError(f'{path}: unsupported file type; expected one of {", ".join(FILE_EXTENSIONS)}')
        return path, True
    raise FileNotFoundError(f'{location}: no such file or directory')


def read_rows(path: Path) -> List[Tuple[int, Any]]:
    """(row number from 1, row) for every row of a JSON lines, JSON or Parquet file, optionally gzipped.

    In JSON lines the row number is the line number; a line that is not valid JSON comes back as None
    (the loader counts it as malformed), blank lines are skipped.
    """
    raw = path.read_bytes()
    if path.name.endswith('.gz'):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f'{path}: not a valid gzip file ({e})') from e
    if not raw.strip():
        raise ValueError(f'{path}: the file is empty')
    if path.name.endswith('.parquet'):
        import pyarrow.parquet  # a dependency of `datasets`; imported here since only Parquet needs it
        try:
            table = pyarrow.parquet.read_table(io.BytesIO(raw))
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ValueError(f'{path}: not a valid Parquet file ({e})') from e
        return list(enumerate(table.to_pylist(), start=1))
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise ValueError(f'{path}: not UTF-8 text (invalid byte at offset {e.start}, line {line}); '
                         'convert the file to UTF-8') from e
    if path.name.endswith(('.json', '.json.gz')):
        return _json_rows(text, path)
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append((line_no, row))
    return rows


def _json_rows(text: str, path: Path) -> List[Tuple[int, Any]]:
    """Rows of a JSON document: a list of rows, or a dict of equally long columns."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); '
                         'for one row per line name the file .jsonl') from e
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
        n_rows = {len(v) for v in doc.values()}
        if len(n_rows) != 1:
            raise ValueError(f'{path}: the columns have different lengths {sorted(n_rows)}')
        doc = [dict(zip(doc, values)) for values in zip(*doc.values())]
    if not isinstance(doc, list):
        raise ValueError(f'{path}: expected a JSON list of rows or a dict of columns, got {type(doc).__name__}')
    return list(enumerate(doc, start=1))


def deterministic_split(n_rows: int, split: str, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Row indices of `split` when one set of rows is divided into train and test.

    The same permutation as `datasets.Dataset.shuffle(seed=42)` (numpy's default_rng), with test the first
    `int(n_rows * test_fraction)` rows: exactly the original's 1% test split of stack-exchange-preferences.
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test' when one file holds the whole data set, got '{split}'")
    permutation = np.random.default_rng(seed).permutation(n_rows)
    n_test = int(n_rows * test_fraction)
    return permutation[:n_test] if split == 'test' else permutation[n_test:]


# ----------------------------------------------------------------------------------------------------------
# Row checks


class LeftOut:
    """Rows a loader leaves out, by reason: a few give a warning, a mostly malformed file a ValueError."""

    def __init__(self, where: str):
        self.where = where
        self.rows: Dict[str, List[int]] = defaultdict(list)

    def add(self, row_no: int, reason: str) -> None:
        self.rows[reason].append(row_no)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def summary(self) -> str:
        return '; '.join(f'{len(rows)} {reason} (rows {", ".join(map(str, rows[:5]))}{", ..." if len(rows) > 5 else ""})'
                         for reason, rows in self.rows.items())

    def report(self, n_rows: int, expected_schema: str) -> None:
        """Warn about the rows left out, or raise if more than MAX_MALFORMED_FRACTION of them were."""
        if not len(self):
            return
        if len(self) > MAX_MALFORMED_FRACTION * n_rows:
            raise ValueError(f'{self.where}: {len(self)} of {n_rows} rows are unusable: {self.summary()}. '
                             f'Is this the right format? Expected rows like {expected_schema}')
        warnings.warn(f'{self.where}: left out {len(self)} of {n_rows} rows: {self.summary()}', DataWarning, stacklevel=3)


def object_rows(rows: Sequence[Tuple[int, Any]], request, description: str,
                left_out: LeftOut) -> Iterator[Tuple[int, dict, str]]:
    """(row number, row, 'WHERE row N') of the rows that are JSON objects, under a progress bar; the others
    are left out as 'not a JSON object'."""
    for row_no, row in _progress(rows, request, description):
        if not isinstance(row, dict):
            left_out.add(row_no, 'not a JSON object')
            continue
        yield row_no, row, f'{left_out.where} row {row_no}'


def check_columns(rows: Sequence[Tuple[int, Any]], columns: Sequence[str], where: str, expected_schema: str) -> None:
    """Raise a ValueError naming the missing columns, judged on the first row that parsed."""
    first = next((row for _, row in rows if isinstance(row, dict)), None)
    if first is None:
        return  # nothing parsed: LeftOut.report says so with the row numbers
    missing = [c for c in columns if c not in first]
    if missing:
        raise ValueError(f'{where}: missing columns {missing} (found {sorted(first)}); expected rows like {expected_schema}')


_TYPE_NAMES = {str: 'a string', list: 'a list', int: 'an integer', float: 'a number', dict: 'an object'}


def check_type(row: Mapping, column: str, types: Tuple[type, ...], where: str) -> Any:
    """row[column], or a ValueError naming the row, the column and what it should be."""
    if column not in row:
        raise ValueError(f"{where}: no '{column}'")
    value = row[column]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = ' or '.join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise ValueError(f"{where}: '{column}' must be {expected}, got {type(value).__name__} {value!r:.80}")
    return value


NUMBER = (int, float)


# ----------------------------------------------------------------------------------------------------------
# Sources: each loader turns one split of one source into the original's structure


@dataclass(frozen=True)
class LoadRequest:
    """What a loader is asked for. `location` is PATH of 'name:PATH' (None: the source's Hub data set)."""
    name: str
    location: Optional[str]
    split: str
    silent: bool = False
    cache_dir: Optional[str] = None
    tokenizer: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Loaded:
    """A loader's result: the original's structure, and whether its text came out of a chat template
    (then the template's special-token text is meant as control tokens and the prompts are in its format)."""
    data: PreferenceData
    chat_rendered: bool = False


class Source(NamedTuple):
    """One entry of SOURCES: the loader, `load(request) -> Loaded`, and how its too long prompts are cut."""
    load: Callable[[LoadRequest], Loaded]
    truncation_mode: str = 'keep_start'  # which end of a too long prompt survives
    generated: bool = False  # made by code (no Hub data set, no 'name:PATH' form)
    version: int = 1  # part of the tokenization cache key: bump it when a generated source's output changes


def source_rows(request: LoadRequest, hub_id: str, columns: Sequence[str], schema: str,
                hub_split: Optional[str] = None, test_fraction: float = TEST_FRACTION) -> Tuple[str, Sequence[Tuple[int, Any]]]:
    """(where, rows) of one split: from `hub_id` when request.location is None, else from local files.

    hub_split: the only split the Hub data set has (stack-exchange-preferences has only 'train'), which is
    then divided like a single local file.
    """
    test_fraction = request.options.get('test_fraction', test_fraction)
    if request.location is None:
        dataset = load_hub_dataset(hub_id, hub_split or request.split, request)
        if hub_split is not None:
            dataset = dataset.select(deterministic_split(len(dataset), request.split, test_fraction))
        rows = _IndexedRows(dataset)
        where = f'{hub_id} ({request.split})'
    else:
        path, needs_split = split_file(request.location, request.split)
        rows = read_rows(path)
        if needs_split:
            rows = [rows[i] for i in deterministic_split(len(rows), request.split, test_fraction)]
        where = str(path) + (f' ({request.split} part)' if needs_split else '')
    check_columns(rows, columns, where, schema)
    return where, rows


class _IndexedRows(Sequence):
    """A Hub `datasets.Dataset` seen as (row number, row) pairs without copying it into a list."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i + 1, self.dataset[i]

    def __iter__(self):
        return enumerate(self.dataset, start=1)


def load_hub_dataset(hub_id: str, split: str, request: LoadRequest):
    """One split of a Hub data set (or of a directory `datasets` can read), via `datasets.load_dataset`."""
    import datasets  # imported lazily: local files and cached runs never need it
    if request.silent:  # `datasets` has no per-call switch; the original disables its bars the same way
        datasets.disable_progress_bars()
    if not request.silent:
        print(f'Loading {hub_id} ({split} split) with datasets.load_dataset...')
    return datasets.load_dataset(hub_id, split=split, cache_dir=request.cache_dir,
                                 **request.options.get('load_dataset_kwargs', {}))


def _progress(rows, request: LoadRequest, desc: str):
    return tqdm.tqdm(rows, desc=desc, disable=request.silent, total=len(rows), mininterval=1.0)


def _add_responses(data: PreferenceData, prompt: str, responses: List[str], pairs: Iterable[Tuple[int, int]]) -> int:
    """Append responses and their pairs to `prompt`'s entry; returns the index of the first new response."""
    entry = data.setdefault(prompt, {'responses': [], 'pairs': [], 'sft_target': ''})
    offset = len(entry['responses'])
    entry['responses'].extend(responses)
    entry['pairs'].extend((offset + i, offset + j) for i, j in pairs)
    return offset


def _set_best_sft_targets(data: PreferenceData, scores: Dict[str, List[float]]) -> None:
    """sft_target = the highest-scored response of each prompt (the first of equals).

    The original looks the score up with responses.index(text), which picks the wrong score when two
    responses have the same text; the index is used directly here."""
    for prompt, entry in data.items():
        entry['sft_target'] = entry['responses'][int(np.argmax(scores[prompt]))]


HH_SCHEMA = '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}'


def split_hh_dialogue(chosen: str, rejected: str) -> Union[Tuple[str, str, str], str]:
    """(prompt, chosen response, rejected response) of one HH row, or the reason it cannot be used.

    The prompt is the text up to and including the last '\\n\\nAssistant:'. The original takes it from
    `chosen` alone and cuts `rejected` at the same length; where the dialogues differ before that point
    (5 of 2312 rows of harmless-base test) that trains on a garbled rejected response, so such rows are
    refused here.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut == -1:
        return "no '\\n\\nAssistant:' in chosen"
    prompt = chosen[:cut + len(ASSISTANT)]
    if not prompt.startswith(HUMAN):
        return "dialogue does not start with '\\n\\nHuman:'"
    if rejected[:rejected.rfind(ASSISTANT) + len(ASSISTANT)] != prompt:
        return "chosen and rejected differ before their last '\\n\\nAssistant:'"
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def load_hh(request: LoadRequest) -> Loaded:
    """Anthropic/hh-rlhf: one pair per row; sft_target = the (last) chosen response of the prompt."""
    where, rows = source_rows(request, 'Anthropic/hh-rlhf', ('chosen', 'rejected'), HH_SCHEMA)
    data: PreferenceData = {}
    left_out = LeftOut(where)
    for row_no, row, at in object_rows(rows, request, 'Processing HH', left_out):
        split = split_hh_dialogue(check_type(row, 'chosen', (str,), at), check_type(row, 'rejected', (str,), at))
        if isinstance(split, str):
            left_out.add(row_no, split)
            continue
        prompt, chosen, rejected = split
        _add_responses(data, prompt, [chosen, rejected], [(0, 1)])
        data[prompt]['sft_target'] = chosen
    left_out.report(len(rows), HH_SCHEMA)
    return Loaded(data)


SHP_SCHEMA = ('{"post_id": str, "domain": str, "upvote_ratio": float, "history": str, "c_root_id_A": str, '
              '"c_root_id_B": str, "created_at_utc_A": int, "created_at_utc_B": int, "score_A": int, "score_B": int, '
              '"human_ref_A": str, "human_ref_B": str, "labels": 0 or 1 (1: A is preferred), '
              '"seconds_difference": float, "score_ratio": float}')
SHP_MIN_SCORE_RATIO = 2.0  # the original keeps only pairs whose scores differ by at least this factor


def shp_score_ratio(score_a: float, score_b: float) -> float:
    """max(a/b, b/a), the original's filter quantity; infinite when only one score is positive (the
    original divides by zero there), 1 when neither is (no usable preference strength)."""
    low, high = sorted((score_a, score_b))
    if low > 0:
        return high / low
    return float('inf') if high > 0 else 1.0


def load_shp(request: LoadRequest) -> Loaded:
    """stanfordnlp/SHP: pairs with score ratio >= 2, preferred side from `labels`, sft_target the best-scored.

    As in the original, all pairs of a post are kept (SHP's card suggests at most 5 per post; the
    original does not, and neither does this)."""
    columns = ('history', 'human_ref_A', 'human_ref_B', 'score_A', 'score_B', 'labels')
    where, rows = source_rows(request, 'stanfordnlp/SHP', columns, SHP_SCHEMA)
    data: PreferenceData = {}
    scores: Dict[str, List[float]] = defaultdict(list)
    left_out = LeftOut(where)
    n_low_ratio = 0
    for row_no, row, at in object_rows(rows, request, 'Processing SHP', left_out):
        history, ref_a, ref_b = (check_type(row, c, (str,), at) for c in ('history', 'human_ref_A', 'human_ref_B'))
        score_a, score_b = (check_type(row, c, NUMBER, at) for c in ('score_A', 'score_B'))
        label = check_type(row, 'labels', (int,), at)
        if label not in (0, 1):
            raise ValueError(f"{at}: 'labels' must be 0 or 1 (1: human_ref_A is preferred), got {label}")
        if shp_score_ratio(score_a, score_b) < SHP_MIN_SCORE_RATIO:
            n_low_ratio += 1
            continue
        prompt = HUMAN + ' ' + history + ASSISTANT
        _add_responses(data, prompt, [' ' + ref_a, ' ' + ref_b], [(0, 1) if label == 1 else (1, 0)])
        scores[prompt].extend([score_a, score_b])
    left_out.report(len(rows), SHP_SCHEMA)
    _set_best_sft_targets(data, scores)
    if not request.silent:
        print(f'{where}: kept {len(rows) - len(left_out) - n_low_ratio} pairs, '
              f'{n_low_ratio} had a score ratio below {SHP_MIN_SCORE_RATIO:g}')
    return Loaded(data)


SE_SCHEMA = ('{"qid": int, "question": html str, "answers": [{"answer_id": int, "author": str, "author_id": int, '
             '"author_profile": str, "pm_score": int, "selected": bool, "text": html str}], "date": str, "metadata": [str]}')


class _HTMLTree(html.parser.HTMLParser):
    """A minimal element tree: (tag, children) tuples and strings; entities decoded, void tags closed."""
    VOID = {'br', 'hr', 'img', 'input', 'meta', 'link', 'area', 'base', 'col', 'embed', 'source', 'track', 'wbr'}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = ('', [])
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = (tag, [])
        self.stack[-1][1].append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):  # close the innermost open `tag`; ignore a stray end tag
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1][1].append(data)


_LINE_TAGS = {'li', 'p', 'div', 'tr', 'blockquote', 'pre', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6'}


def _text_of(node) -> str:
    """The text inside a node; <br> and the end of a list item, paragraph or heading give a line break."""
    if isinstance(node, str):
        return node
    tag, children = node
    text = '\n' if tag == 'br' else ''.join(_text_of(child) for child in children)
    return text + '\n' if tag in _LINE_TAGS and not text.endswith('\n') else text


def _code_blocks(node) -> List[str]:
    if isinstance(node, str):
        return []
    if node[0] == 'code':
        return [_text_of(node)]
    return [block for child in node[1] for block in _code_blocks(child)]


def strip_html_tags(html_string: str) -> str:
    """Text of StackExchange HTML, tags removed except code blocks, kept as '<code>...</code>'.

    Like the original (BeautifulSoup), top-level blocks are joined by blank lines: <pre>/<code> blocks
    become '<code>' + code + '</code>' and <p> its text. Unlike it, the text inside inline tags of a
    paragraph (<a>, <em>, inline <code>) and of other blocks (lists, quotes, headings) is kept: the
    original drops those words, leaving sentences with holes.
    """
    parser = _HTMLTree()
    parser.feed(html_string)
    parser.close()
    blocks = []
    for node in parser.root[1]:
        if not isinstance(node, str) and node[0] in ('pre', 'code'):
            blocks.extend('<code>' + code + '</code>' for code in (_code_blocks(node) or [_text_of(node)]))
        else:
            text = _text_of(node).strip()
            if text:
                blocks.append(text)
    return '\n\n'.join(blocks)


def load_se(request: LoadRequest) -> Loaded:
    """HuggingFaceH4/stack-exchange-preferences: every pair of answers ordered by pm_score, 1% test split.

    Pairs of answers with equal pm_score are left out: the original orders them arbitrarily (j over i),
    which teaches a preference the data does not have."""
    where, rows = source_rows(request, 'HuggingFaceH4/stack-exchange-preferences', ('question', 'answers'),
                              SE_SCHEMA, hub_split='train')
    data: PreferenceData = {}
    scores: Dict[str, List[float]] = defaultdict(list)
    left_out = LeftOut(where)
    for row_no, row, at in object_rows(rows, request, 'Processing SE', left_out):
        question = check_type(row, 'question', (str,), at)
        answers = check_type(row, 'answers', (list,), at)
        for k, answer in enumerate(answers):
            if not isinstance(answer, dict):
                raise ValueError(f'{at}: answers[{k}] must be an object like {SE_SCHEMA}, got {answer!r:.80}')
            check_type(answer, 'text', (str,), f'{at} answers[{k}]')
            check_type(answer, 'pm_score', NUMBER, f'{at} answers[{k}]')
        if not answers:
            left_out.add(row_no, 'question without answers')
            continue
        prompt = HUMAN + ' ' + strip_html_tags(question) + ASSISTANT
        responses = [' ' + strip_html_tags(a['text']) for a in answers]
        row_scores = [a['pm_score'] for a in answers]
        pairs = [(i, j) if row_scores[i] > row_scores[j] else (j, i)
                 for i in range(len(answers)) for j in range(i + 1, len(answers)) if row_scores[i] != row_scores[j]]
        _add_responses(data, prompt, responses, pairs)
        scores[prompt].extend(row_scores)
    left_out.report(len(rows), SE_SCHEMA)
    _set_best_sft_targets(data, scores)
    return Loaded(data)


GENERIC_SCHEMA = ('{"prompt": str, "chosen": str, "rejected": str} or, conversational, '
                  '{"prompt": str or [{"role", "content"}], "chosen": [{"role", "content"}], "rejected": [...]}')


def hh_style_prompt(prompt: str) -> str:
    """'\\n\\nHuman: ' + prompt + '\\n\\nAssistant:', unless `prompt` already has that form."""
    if prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT):
        return prompt
    return HUMAN + ' ' + prompt + ASSISTANT


def hh_style_response(response: str) -> str:
    """' ' + response, as the original does for SHP and SE; a response that already starts with a space
    (HH-style data, where it follows 'Assistant:') is left as it is rather than given two."""
    return response if response.startswith(' ') else ' ' + response


def _messages(value: Any, column: str, at: str) -> List[Dict[str, str]]:
    for k, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get('role'), str) and isinstance(message.get('content'), str)):
            raise ValueError(f"{at}: '{column}'[{k}] must be a message {{\"role\": str, \"content\": str}}, got {message!r:.80}")
    return value


def split_conversation(prompt: Any, chosen: list, rejected: list, at: str) -> Union[Tuple[list, list, list], str]:
    """(prompt messages, chosen completion, rejected completion) of a conversational row, or why not.

    Handles both layouts in use: completions only (TRL: prompt is a message list, chosen [assistant]) and
    whole conversations (HuggingFaceH4: chosen = [user, assistant], prompt a string copy of the question)."""
    chosen, rejected = _messages(chosen, 'chosen', at), _messages(rejected, 'rejected', at)
    if isinstance(prompt, list):
        prompt = _messages(prompt, 'prompt', at)
        n = len(prompt)
        chosen = chosen[n:] if chosen[:n] == prompt else chosen
        rejected = rejected[n:] if rejected[:n] == prompt else rejected
    elif len(chosen) == 1 and len(rejected) == 1:
        prompt = [{'role': 'user', 'content': prompt}]
    else:
        if chosen[:-1] != rejected[:-1]:
            return 'chosen and rejected differ before their last message'
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if not chosen or not rejected:
        return 'empty chosen or rejected completion'
    return prompt, chosen, rejected


def render_chat(tokenizer, prompt: list, completion: list) -> Union[Tuple[str, str], str]:
    """(prompt text ending with the generation prompt, completion text) from the chat template, or why not."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        return 'the chat template renders the prompt differently inside the whole conversation'
    return prompt_text, full_text[len(prompt_text):]


def _special_token_texts(tokenizer) -> List[str]:
    decoder = getattr(tokenizer, 'added_tokens_decoder', {})
    return sorted({*tokenizer.all_special_tokens, *(t.content for t in decoder.values() if t.special)})


def closed_turn(response: str, special_texts: Sequence[str]) -> Optional[str]:
    """A chat-rendered response up to and including the special token that closes it, or None if it ends
    with none: 'Paris.<|im_end|>\n' -> 'Paris.<|im_end|>' (SmolLM2), 'Paris.' -> None.

    The whitespace after the end-of-turn token separates turns (the next '<|im_start|>' follows it); the
    model never has to produce it, since generation stops at the end-of-turn token."""
    stripped = response.rstrip()
    return stripped if any(stripped.endswith(s) for s in special_texts) else None


def end_of_turn_token_id(tokenizer) -> Optional[int]:
    """The token id that closes an assistant turn in the tokenizer's chat template (SmolLM2: <|im_end|>, 2),
    None if the template closes it with no special token."""
    rendered = render_chat(tokenizer, [{'role': 'user', 'content': 'Hi'}], [{'role': 'assistant', 'content': 'Hello'}])
    closed = None if isinstance(rendered, str) else closed_turn(rendered[1], _special_token_texts(tokenizer))
    if closed is None:
        return None
    return tokenizer.convert_tokens_to_ids(next(s for s in _special_token_texts(tokenizer) if closed.endswith(s)))


_HH_TURN = re.compile(r'(\n\nHuman:|\n\nAssistant:)')


def hh_messages(prompt: str) -> List[Dict[str, str]]:
    """The messages of an HH-format prompt: '\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:' ->
    [user A, assistant B, user C] (each text stripped; the final empty Assistant turn is the one to answer)."""
    parts = _HH_TURN.split(prompt)[1:]  # marker, text, marker, text, ...
    roles = {HUMAN: 'user', ASSISTANT: 'assistant'}
    messages = [{'role': roles[marker], 'content': text.strip()} for marker, text in zip(parts[::2], parts[1::2])]
    return messages[:-1]


def render_hh_as_chat(data: PreferenceData, tokenizer, name: str) -> PreferenceData:
    """HH-format data (prompts '\n\nHuman: ...\n\nAssistant:', responses ' ...') as the tokenizer's chat
    template renders the same dialogues, for an instruct model (the option render_hh_with_chat_template).

    Prompts whose dialogue or responses hold special-token text (a literal '<|im_end|>') are left out and
    reported: rendered text is tokenized with its special tokens as control tokens (see load_generic)."""
    if tokenizer is None or getattr(tokenizer, 'chat_template', None) is None:
        raise ValueError(f'{name}: render_hh_with_chat_template=true needs a tokenizer with a chat template, and '
                         f'{getattr(tokenizer, "name_or_path", None)!r} has none; set render_hh_with_chat_template=false')
    specials = _special_token_texts(tokenizer)
    rendered: PreferenceData = {}
    left_out: Dict[str, List[int]] = defaultdict(list)
    for n, (prompt, entry) in enumerate(data.items(), start=1):
        if any(s in text for text in (prompt, *entry['responses']) for s in specials):
            left_out['special-token text inside a message'].append(n)
            continue
        messages = hh_messages(prompt)
        texts = [render_chat(tokenizer, messages, [{'role': 'assistant', 'content': r.strip()}])
                 for r in (*entry['responses'], entry['sft_target'])]
        if any(isinstance(t, str) for t in texts):
            left_out[next(t for t in texts if isinstance(t, str))].append(n)
            continue
        chat_prompt = texts[0][0]
        _add_responses(rendered, chat_prompt, [t[1] for t in texts[:-1]], entry['pairs'])
        rendered[chat_prompt]['sft_target'] = texts[-1][1]
    if left_out:
        summary = '; '.join(f'{len(ns)} {reason} (prompts {", ".join(map(str, ns[:5]))}{", ..." if len(ns) > 5 else ""})'
                            for reason, ns in left_out.items())
        warnings.warn(f'{name}: rendering with the chat template left out {sum(map(len, left_out.values()))} of '
                      f'{len(data)} prompts: {summary}', DataWarning, stacklevel=3)
    return rendered


def load_generic(request: LoadRequest) -> Loaded:
    """The generic preference format: prompt/chosen/rejected as strings (rendered HH-style) or as message
    lists (rendered with the tokenizer's chat template). Pairs whose chosen and rejected are the same text
    are left out (no preference; 4 of UltraFeedback's binarized train rows)."""
    hub_id = request.location
    if not Path(hub_id).expanduser().exists():
        request = dataclasses.replace(request, location=None)
    where, rows = source_rows(request, hub_id, ('prompt', 'chosen', 'rejected'), GENERIC_SCHEMA)
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    chat = isinstance(first.get('chosen'), list)
    if chat:
        tokenizer = request.tokenizer
        if tokenizer is None or getattr(tokenizer, 'chat_template', None) is None:
            raise ValueError(f'{request.name}: this data set is in the conversational form (message lists), which is '
                             'rendered with a chat template, and the tokenizer given has none; use a tokenizer with '
                             'a chat template (or set tokenizer.chat_template)')
        specials = _special_token_texts(tokenizer)
    data: PreferenceData = {}
    left_out = LeftOut(where)
    for row_no, row, at in object_rows(rows, request, f'Processing {request.name}', left_out):
        if not chat:
            prompt, chosen, rejected = (check_type(row, c, (str,), at) for c in ('prompt', 'chosen', 'rejected'))
            prompt, chosen, rejected = hh_style_prompt(prompt), hh_style_response(chosen), hh_style_response(rejected)
        else:
            parts = split_conversation(check_type(row, 'prompt', (str, list), at), check_type(row, 'chosen', (list,), at),
                                       check_type(row, 'rejected', (list,), at), at)
            if isinstance(parts, str):
                left_out.add(row_no, parts)
                continue
            if any(s in m['content'] for messages in parts for m in messages for s in specials):
                # The template's own special tokens must stay control tokens, so the text cannot be tokenized
                # with split_special_tokens; a literal '<|im_end|>' in a message would turn into one.
                left_out.add(row_no, 'special-token text inside a message')
                continue
            rendered = [render_chat(request.tokenizer, parts[0], completion) for completion in parts[1:]]
            if any(isinstance(r, str) for r in rendered):
                left_out.add(row_no, next(r for r in rendered if isinstance(r, str)))
                continue
            (prompt, chosen), (_, rejected) = rendered
        if chosen == rejected:
            left_out.add(row_no, 'chosen and rejected are the same text')
            continue
        _add_responses(data, prompt, [chosen, rejected], [(0, 1)])
        data[prompt]['sft_target'] = chosen
    left_out.report(len(rows), GENERIC_SCHEMA)
    return Loaded(data, chat_rendered=chat)


# ----------------------------------------------------------------------------------------------------------
# synthetic: the generated task of synthetic_task.py (datasets=[synthetic]); its thin loaders


def load_synthetic(request: LoadRequest) -> Loaded:
    """The synthetic task's split (see synthetic_task.py); options from `dataset_options['synthetic']`
    (the config's `synthetic:` block), the defaults from config/config.yaml."""
    options = synthetic_options(request.options.get('synthetic', {}))
    prompts = synthetic_prompts(options['n_test'] + options['n_train'])
    if request.split == 'train' and options['train_pairs'] is not None:
        data = load_synthetic_pairs_file(Path(options['train_pairs']).expanduser(), set(prompts[:options['n_test']]))
        if not request.silent:
            print(f'synthetic (train, pairs from {options["train_pairs"]}): {len(data)} prompts, {describe_synthetic(data)}')
        return Loaded(data)
    split_prompts = prompts[:options['n_test']] if request.split == 'test' else prompts[options['n_test']:]
    data: PreferenceData = {}
    for prompt in split_prompts:
        chosen, rejected = synthetic_pair(prompt, request.split, options['low_gap_fraction'], options['flip_fraction'])
        data[prompt] = {'responses': [chosen, rejected], 'pairs': [(0, 1)], 'sft_target': ' ' + synthetic_gold_answer(prompt)}
    if not request.silent:
        print(f'synthetic ({request.split}): {len(data)} prompts, {describe_synthetic(data)}')
    return Loaded(data)


def load_synthetic_pairs_file(path: Path, test_prompts: set) -> PreferenceData:
    """The training pairs of `synthetic.train_pairs` (rows {prompt, chosen, rejected}, e.g. written by
    sample_pairs.py): every row must be a synthetic training prompt (a test prompt would leak the held-out
    set into training) with two different string responses; ValueError naming the file and row otherwise.
    Several rows of one prompt become several pairs of it."""
    if not path.is_file():
        raise FileNotFoundError(f'synthetic.train_pairs={str(path)!r}: no such file; write one with '
                                f'`python sample_pairs.py SFT_RUN_DIR --out {path}`')
    data: PreferenceData = {}
    for row_no, row in read_rows(path):
        at = f'synthetic.train_pairs {path} row {row_no}'
        if not isinstance(row, dict):
            raise ValueError(f'{at}: not a JSON object; expected {{"prompt": ..., "chosen": ..., "rejected": ...}}')
        prompt, chosen, rejected = (check_type(row, c, (str,), at) for c in ('prompt', 'chosen', 'rejected'))
        try:
            gold = synthetic_gold_answer(prompt)
        except ValueError as e:
            raise ValueError(f'{at}: {e}') from None
        if prompt in test_prompts:
            raise ValueError(f'{at}: {prompt!r} is a test prompt of the synthetic task; training on it would '
                             f'leak the held-out set (sample pairs from training prompts only)')
        if chosen == rejected:
            raise ValueError(f'{at}: chosen and rejected are the same text {chosen!r}')
        entry = data.setdefault(prompt, {'responses': [], 'pairs': [], 'sft_target': ' ' + gold})
        for response in (chosen, rejected):
            if response not in entry['responses']:
                entry['responses'].append(response)
        entry['pairs'].append((entry['responses'].index(chosen), entry['responses'].index(rejected)))
    if not data:
        raise ValueError(f'synthetic.train_pairs {path}: no pairs in the file')
    return data


# The dispatch of get_dataset: name -> Source. 'name' loads the Hub data set, 'name:PATH' local files.
SOURCES: Dict[str, Source] = {
    'hh': Source(load_hh, truncation_mode='keep_end'),  # keep the end of a long dialogue: the last turns
    'shp': Source(load_shp),
    'se': Source(load_se),
    'synthetic': Source(load_synthetic, generated=True, version=2)  # 2: one-edit near misses
}
GENERIC = Source(load_generic)
_HUB_ID = re.compile(r'[\w.-]+/[\w.-]+')


def resolve_name(name: str) -> Tuple[str, Source, Optional[str]]:
    """(source key, Source, location) of a data set entry; ValueError listing the valid forms."""
    if name in SOURCES:
        return name, SOURCES[name], None
    prefix, colon, location = name.partition(':')
    if colon and prefix in SOURCES and not SOURCES[prefix].generated:
        if not location:
            raise ValueError(f"'{name}': give a path after the colon, e.g. '{prefix}:data/{prefix}'")
        return prefix, SOURCES[prefix], location
    if Path(name).expanduser().exists() or _HUB_ID.fullmatch(name):
        return 'generic', GENERIC, name
    if name.endswith(FILE_EXTENSIONS) or name.startswith(('/', '.', '~')):
        raise FileNotFoundError(f"'{name}': no such file or directory")
    hub = [s for s in SOURCES if not SOURCES[s].generated]
    generated = [s for s in SOURCES if SOURCES[s].generated]
    raise ValueError(f"Unknown dataset '{name}'. Valid: {', '.join(hub)} (from the Hub); "
                     f"{', '.join(generated)} (generated, no download); "
                     f"{', '.join(s + ':PATH' for s in hub)} (local files in that schema: a directory with "
                     f"train.*/test.* or one .jsonl/.json/.parquet file, optionally .gz); or a Hub id 'owner/name' "
                     f"or an existing local path in the generic prompt/chosen/rejected format")


def load_source(name: str, split: str, silent: bool = False, cache_dir: Optional[str] = None, tokenizer=None,
                dataset_options: Optional[Mapping[str, Any]] = None) -> Tuple[Loaded, Source]:
    """get_dataset's result with its Source and whether it is chat-rendered (what tokenization needs)."""
    _, source, location = resolve_name(name)
    request = LoadRequest(name, location, split, silent, cache_dir, tokenizer, dict(dataset_options or {}))
    loaded = source.load(request)
    if request.options.get('render_hh_with_chat_template') and not loaded.chat_rendered and not source.generated:
        loaded = Loaded(render_hh_as_chat(loaded.data, tokenizer, name), chat_rendered=True)
    for prompt, entry in loaded.data.items():
        assert set(entry) == {'responses', 'pairs', 'sft_target'}, f'{name}: unexpected keys {sorted(entry)}'
        assert loaded.chat_rendered or (prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)), prompt[:80]
    return loaded, source


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
                  max_length: int, max_prompt_length: int) -> Tuple[List[int], List[int], List[int]]:
    """The original's truncation of one (prompt, chosen + EOS, rejected + EOS) triple of token ids.

    If prompt + the longer response exceeds max_length, the prompt is cut to max_prompt_length (its end
    kept for 'keep_end', its start for 'keep_start'); if that is still too long, both responses are cut to
    max_length - max_prompt_length tokens (which can drop their EOS, as in the original).
    """
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        if truncation_mode == 'keep_start':
            prompt = prompt[:max_prompt_length]
        elif truncation_mode == 'keep_end':
            prompt = prompt[-max_prompt_length:]
        else:
            raise ValueError(f"Unknown truncation mode '{truncation_mode}'; expected 'keep_start' or 'keep_end'")
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[:max_length - max_prompt_length], rejected[:max_length - max_prompt_length]
    return prompt, chosen, rejected


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
                   sft_mode: bool = False, chat_rendered: bool = False, silent: bool = True) -> TokenizedSplit:
    """Every example of `data` tokenized: unique prompts and responses in batches, then truncated per pair."""
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
    specials = _special_token_texts(tokenizer) if chat_rendered else []
    closed = [closed_turn(t, specials) if chat_rendered else None for t in texts]
    response_tokens = [ids if c is not None else ids + [eos] for ids, c in
                       zip(encode_texts(tokenizer, [c if c is not None else t for t, c in zip(texts, closed)],
                                        chat_rendered, silent), closed)]
    truncated = [truncate_pair(prompt_tokens[g], response_tokens[c], response_tokens[c if r < 0 else r],
                               truncation_mode, max_length, max_prompt_length) for g, c, r in examples]
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
                               sft_mode, loaded.chat_rendered, silent)
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


def padding_fraction(batch: Mapping[str, Any]) -> float:
    """Share of the policy's forward pass that is padding: chosen and rejected are run together, padded to
    the longer of the two (the original's concatenated_inputs), so padded / (rows * that length)."""
    masks = [batch[k] for k in ('chosen_attention_mask', 'rejected_attention_mask') if k in batch]
    width = max(m.shape[1] for m in masks)
    total = sum(m.shape[0] for m in masks) * width
    return 1.0 - sum(int(m.sum()) for m in masks) / total


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
