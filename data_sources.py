"""Where preference data comes from: the readers of every source, each giving {prompt: {responses, pairs, sft_target}}.

    from data_sources import load_source
    loaded, source = load_source('hh:/data/hh-rlhf', 'train')      # Loaded(data, chat_rendered, messages), its Source
    loaded.data['\n\nHuman: ...\n\nAssistant:']                   # {'responses': [...], 'pairs': [(0, 1)], 'sft_target': ...}
    loaded.prompt_messages('\n\nHuman: ...\n\nAssistant:')        # [{'role': 'user', 'content': '...'}]: the dialogue

preference_datasets.get_dataset is the original's entry point to the same data; preference_datasets.py turns it into
tokenized, cached, padded batches. The names a data set entry may take, and how each is read, are in
preference_datasets.py's docstring.

To add a source (e.g. a generated `synthetic` task): write `load_synthetic(request: LoadRequest) -> Loaded`
and add one line to `SOURCES`; `dataset_options` reaches it as `request.options`.
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
import tqdm

from chat_format import Messages, hh_messages, render_chat, special_token_texts
from synthetic_task import (describe_synthetic, synthetic_gold_answer, synthetic_options, synthetic_pair,
                            synthetic_prompts)
from utils import ASSISTANT, HUMAN

PreferenceData = Dict[str, Dict[str, Union[List[str], List[Tuple[int, int]], str]]]

# A local file given as the whole data set is split this way; 1% test is what the original does for `se`.
SPLIT_SEED = 42
TEST_FRACTION = 0.01
# A file where more rows than this are malformed is almost surely in the wrong format: stop rather than warn.
MAX_MALFORMED_FRACTION = 0.5
FILE_EXTENSIONS = ('.jsonl', '.jsonl.gz', '.json', '.json.gz', '.parquet')


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
    """A loader's result: the original's structure, whether its text came out of a chat template (then the
    template's special-token text is meant as control tokens and the prompts are in its format), and for a
    chat-rendered prompt the messages it was rendered from (to cut a too long one inside the conversation and
    render it again, and to show judges the dialogue without the template's markup)."""
    data: PreferenceData
    chat_rendered: bool = False
    messages: Dict[str, Messages] = field(default_factory=dict)

    def prompt_messages(self, prompt: str) -> Messages:
        """The dialogue of one prompt of `data`: the messages it was rendered from, or those of its HH-format text."""
        return self.messages[prompt] if self.chat_rendered else hh_messages(prompt)


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


def render_hh_as_chat(data: PreferenceData, tokenizer, name: str) -> Loaded:
    """HH-format data (prompts '\n\nHuman: ...\n\nAssistant:', responses ' ...') as the tokenizer's chat
    template renders the same dialogues, for an instruct model (the option render_hh_with_chat_template).

    Prompts whose dialogue or responses hold special-token text (a literal '<|im_end|>') are left out and
    reported: rendered text is tokenized with its special tokens as control tokens (see load_generic)."""
    if tokenizer is None or getattr(tokenizer, 'chat_template', None) is None:
        raise ValueError(f'{name}: render_hh_with_chat_template=true needs a tokenizer with a chat template, and '
                         f'{getattr(tokenizer, "name_or_path", None)!r} has none; set render_hh_with_chat_template=false')
    specials = special_token_texts(tokenizer)
    rendered: PreferenceData = {}
    rendered_from: Dict[str, Messages] = {}
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
        rendered_from.setdefault(chat_prompt, messages)
    if left_out:
        summary = '; '.join(f'{len(ns)} {reason} (prompts {", ".join(map(str, ns[:5]))}{", ..." if len(ns) > 5 else ""})'
                            for reason, ns in left_out.items())
        warnings.warn(f'{name}: rendering with the chat template left out {sum(map(len, left_out.values()))} of '
                      f'{len(data)} prompts: {summary}', DataWarning, stacklevel=3)
    return Loaded(rendered, chat_rendered=True, messages=rendered_from)


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
        specials = special_token_texts(tokenizer)
    data: PreferenceData = {}
    messages: Dict[str, Messages] = {}
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
        if chat:
            messages.setdefault(prompt, parts[0])
    left_out.report(len(rows), GENERIC_SCHEMA)
    return Loaded(data, chat_rendered=chat, messages=messages)


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
                                f'`python scripts/sample_pairs.py SFT_RUN_DIR --out {path}`')
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
        loaded = render_hh_as_chat(loaded.data, tokenizer, name)
    for prompt, entry in loaded.data.items():
        assert set(entry) == {'responses', 'pairs', 'sft_target'}, f'{name}: unexpected keys {sorted(entry)}'
        assert loaded.chat_rendered or (prompt.startswith(HUMAN) and prompt.endswith(ASSISTANT)), prompt[:80]
        assert not loaded.chat_rendered or prompt in loaded.messages, f'{name}: no messages for {prompt[:80]!r}'
    return loaded, source
