"""Judges of generated responses, behind one interface: scorers give each response a number, pairwise judges
say which of two responses to a prompt is better.

    from judges import make_judge
    judge = make_judge('sentiment')                     # a scorer
    judge.score(prompts, responses)                     # -> [float]
    judge = make_judge('llm:/path/to/chat_model')       # a pairwise judge
    judge.compare(prompts, responses, references)       # -> [Comparison]: score of each response against its reference

The judges (the `judge=` of evaluate.py and `--judge` of sample_pairs.py):

    gold         scorer: 1 if the response is the synthetic task's gold answer (stripped), else 0; its mean over
                 greedy answers to the first test prompts is train.py's gold_eval/accuracy
    sentiment    scorer: the VADER compound score in [-1, 1] (Hutto & Gilbert 2014, `vaderSentiment`, lexicon
                 shipped with the package, no download); the positive-sentiment reward of a controlled
                 generation task
    reward:PATH  scorer: a Hugging Face sequence-classification reward model on prompt + response (one output:
                 its logit; two: logit 1 − logit 0, the log-odds of label 1); the dialogue goes through the reward
                 model's own chat template, or as HH-format text where it has none
    llm:PATH     pairwise: a local chat model (any source generation.load_model reads) asked the DPO paper's
                 GPT-4 dialogue prompt, greedy
    api:MODEL    pairwise: the same prompt to MODEL behind an OpenAI-compatible endpoint (the paper's protocol
                 with GPT-4, or a local server such as `transformers serve`): OPENAI_BASE_URL and OPENAI_API_KEY
                 are read from the environment only and never written anywhere

Judges read a prompt as its dialogue (generation.Prompt.dialogue, the messages without any chat template's markup;
a plain string is read as the HH-format text it is), never as the policy's chat-rendered text: a pairwise judge is
shown the dialogue as 'Human: ... Assistant: ...' text inside its own template, a reward model is given it in its own
template. A local judge's prompt over its length limit loses the start of the query and the ends of the responses,
never its instructions (judge_prompt_ids).

A pairwise judge sees each pair twice, the response first (as A) and then second (as B), so that a judge
preferring one position cancels out: each order gives 1 (the response wins), 0 (it loses) or ½ (no readable
verdict), and the pair scores the mean of the two. A judge that always answers "A" scores ½ on every pair;
"the order of summaries or responses are randomly chosen for every evaluation" in the DPO paper (App. C.2), which
cancels the bias only on average.
"""
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch

from chat_format import Messages, hh_messages
from data_sources import hh_style_response
from synthetic_task import synthetic_gold_answer, synthetic_instruction
from utils import ASSISTANT, UserError

if TYPE_CHECKING:
    from generation import Prompt

# What a judge is given as a prompt: a generation.Prompt (its .dialogue and .plain_text are read), or a string,
# read as an HH-format text ('\n\nHuman: ...\n\nAssistant:').
JudgedPrompt = Union[str, 'Prompt']

JUDGE_FORMS = 'gold, sentiment, reward:PATH, llm:PATH or api:MODEL'

# The DPO paper's dialogue win-rate prompt for GPT-4 (Rafailov et al. 2023, "Direct Preference Optimization",
# Appendix C.2), with the query and the two responses filled in.
DIALOGUE_PROMPT = """For the following query to a chatbot, which response is more helpful?

Query: {query}

Response A:
{a}

Response B:
{b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. \
SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response \
should use the format:
Comparison: <one-sentence comparison and explanation>
More helpful: <"A" or "B">"""

_VERDICT = re.compile(r'More helpful:\W*([AB])\b', re.IGNORECASE)
_BARE_VERDICT = re.compile(r'^\W*([AB])\W*$')


@dataclass
class Comparison:
    """A response judged against a reference in both orders: the verdict of each ('A', 'B' or None when the
    judge's text had none) and the response's score, the mean of its two outcomes (see the module docstring)."""
    verdict_response_first: Optional[str]
    verdict_response_second: Optional[str]
    score: float


def parse_verdict(text: str) -> Optional[str]:
    """'A' or 'B' from a judge's answer in the paper's format ('More helpful: A', the last such line), else from
    an answer that is the letter alone ('A', '"B".'); None otherwise (a ramble that merely ends with a letter is no
    verdict)."""
    found = _VERDICT.findall(text)
    if found:
        return found[-1].upper()
    bare = _BARE_VERDICT.match(text.strip())
    return bare.group(1).upper() if bare else None


def comparison(verdict_response_first: Optional[str], verdict_response_second: Optional[str]) -> Comparison:
    """The score of a response from the two verdicts (response as A, then as B): 1 per win, ½ per unreadable
    verdict, averaged; a judge answering "A" both times gives (1 + 0) / 2 = ½."""
    first = {'A': 1.0, 'B': 0.0}.get(verdict_response_first, 0.5)
    second = {'A': 0.0, 'B': 1.0}.get(verdict_response_second, 0.5)
    return Comparison(verdict_response_first, verdict_response_second, (first + second) / 2)


def plain_text(prompt: JudgedPrompt) -> str:
    """The prompt's dialogue as HH-format text: a string as it is, a Prompt's plain_text (no chat markup)."""
    return prompt if isinstance(prompt, str) else prompt.plain_text


def dialogue(prompt: JudgedPrompt) -> Messages:
    """The prompt's messages: those of an HH-format string, a Prompt's dialogue."""
    return hh_messages(prompt) if isinstance(prompt, str) else prompt.dialogue


def dialogue_query(prompt: JudgedPrompt) -> str:
    """The query shown to a pairwise judge: the dialogue as HH-format text without the final '\\n\\nAssistant:'
    ('Human: How do I boil an egg?'), whatever chat template the policy's prompt was rendered with."""
    text = plain_text(prompt)
    return (text[:-len(ASSISTANT)] if text.endswith(ASSISTANT) else text).strip()


@dataclass(frozen=True)
class JudgeQuery:
    """What a pairwise judge is asked once: the query and the responses shown as A and B."""
    query: str
    a: str
    b: str

    def text(self) -> str:
        """DIALOGUE_PROMPT filled in."""
        return DIALOGUE_PROMPT.format(query=self.query, a=self.a, b=self.b)


# A part of the query or of a response cut to fit the judge's length limit is marked where the cut is.
CUT_MARK = '[...]'


def judge_prompt_ids(tokenizer, query: JudgeQuery, max_length: int) -> List[int]:
    """Token ids of DIALOGUE_PROMPT filled in with `query`, as the user turn of the judge's chat template with its
    generation prompt (without one: the text and a newline), in at most max_length tokens.

    The template's text is tokenized with its special tokens as control tokens and the filled-in prompt as plain
    text, so markup inside the query or a response ('<|im_start|>' written out) cannot open a turn of the judge's
    own. A prompt over max_length is cut inside the template, in the query and the responses only, never in the
    instructions or the verdict format: the longest of the three is shortened first (each keeps at least as much
    as the others, up to its own length); the query keeps its end (the last turns, where the question is), a
    response its start, each marked with CUT_MARK where it was cut. UserError when the instructions alone do not
    fit.
    """
    from preference_datasets import encode_texts
    before, after = _user_turn(tokenizer)
    parts = encode_texts(tokenizer, [before, after], parse_special_tokens=True)
    ids_of = lambda q: parts[0] + encode_texts(tokenizer, [q.text()])[0] + parts[1]
    ids = ids_of(query)
    fields = (query.query, query.a, query.b)
    spans = [tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                       return_offsets_mapping=True)['offset_mapping'] for text in fields]
    budget = sum(map(len, spans)) - (len(ids) - max_length)
    while len(ids) > max_length:
        if budget < 0:
            raise UserError(f'the judge\'s prompt limit of {max_length} tokens is shorter than its instructions '
                            f'({len(ids_of(JudgeQuery("", "", "")))} tokens with an empty query and responses): '
                            f'raise it')
        kept = _fair_shares([len(s) for s in spans], budget)
        query_end, a, b = (_kept_text(text, s, k, keep_end=(i == 0)) for i, (text, s, k) in
                           enumerate(zip(fields, spans, kept)))
        ids = ids_of(JudgeQuery(query_end, a, b))
        budget -= max(1, len(ids) - max_length)
    return ids


def _user_turn(tokenizer) -> Tuple[str, str]:
    """The judge template's text before and after a user message's content (generation prompt included)."""
    if not getattr(tokenizer, 'chat_template', None):
        return '', '\n'
    mark = 'JUDGE-QUERY-PROBE'
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': mark}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(mark)
    return before, after


def _fair_shares(lengths: Sequence[int], budget: int) -> List[int]:
    """How many of each part's tokens stay within `budget`: the largest cap c with Σ min(length, c) ≤ budget, and
    what is left of the budget one token each to the first parts longer than c (lengths 10, 50, 200 in 100: 10, 45,
    45)."""
    low, high = 0, max(lengths, default=0)
    while low < high:  # the largest c with Σ min(length, c) ≤ budget
        c = (low + high + 1) // 2
        low, high = (c, high) if sum(min(n, c) for n in lengths) <= budget else (low, c - 1)
    kept = [min(n, low) for n in lengths]
    spare = budget - sum(kept)
    for i, n in enumerate(lengths):
        if n > low and spare > 0:
            kept[i], spare = kept[i] + 1, spare - 1
    return kept


def _kept_text(text: str, spans, kept: int, keep_end: bool) -> str:
    """`text` cut to `kept` of its tokens (their character spans given), at the start or the end, marked."""
    if kept >= len(spans):
        return text
    if keep_end:
        return CUT_MARK + ' ' + (text[spans[len(spans) - kept][0]:].lstrip() if kept else '')
    return (text[:spans[kept - 1][1]].rstrip() if kept else '') + ' ' + CUT_MARK


class Scorer:
    """A judge that scores each response alone."""
    pairwise = False

    def __init__(self, spec: str):
        self.spec = spec

    def score(self, prompts: Sequence[JudgedPrompt], responses: Sequence[str]) -> List[float]:
        raise NotImplementedError


class PairwiseJudge:
    """A judge that says which of two responses is better; subclasses answer `verdict_texts`."""
    pairwise = True

    def __init__(self, spec: str):
        self.spec = spec

    @staticmethod
    def queries(prompts: Sequence[JudgedPrompt], responses: Sequence[str],
                references: Sequence[str]) -> List[JudgeQuery]:
        """What `compare` asks: for each prompt the response as A against the reference as B, then the other order."""
        queries = []
        for prompt, response, reference in zip(prompts, responses, references):
            query = dialogue_query(prompt)
            queries.append(JudgeQuery(query, response.strip(), reference.strip()))
            queries.append(JudgeQuery(query, reference.strip(), response.strip()))
        return queries

    def verdict_texts(self, queries: Sequence[JudgeQuery]) -> List[str]:
        """The judge's answer to each query (DIALOGUE_PROMPT filled in)."""
        raise NotImplementedError

    def compare(self, prompts: Sequence[JudgedPrompt], responses: Sequence[str],
                references: Sequence[str]) -> List[Comparison]:
        """Each response against its reference, judged in both orders (see the module docstring)."""
        verdicts = [parse_verdict(text) for text in self.verdict_texts(self.queries(prompts, responses, references))]
        return [comparison(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(responses))]


class GoldScorer(Scorer):
    """1.0 for the synthetic task's gold answer (surrounding whitespace ignored), else 0.0."""

    def score(self, prompts, responses):
        return [float(r.strip() == synthetic_gold_answer(plain_text(p))) for p, r in zip(prompts, responses)]

    @staticmethod
    def check_prompts(prompts: Sequence[str]) -> None:
        """ValueError naming the first prompt that is not one of the synthetic task's."""
        for prompt in prompts:
            try:
                synthetic_instruction(prompt)
            except ValueError as e:
                raise ValueError(f'judge=gold scores the synthetic task only (datasets=[synthetic]): {e}') from None


class SentimentScorer(Scorer):
    """VADER's compound sentiment score of the response alone, in [-1, 1]."""

    def __init__(self, spec: str):
        super().__init__(spec)
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, responses):
        return [self.analyzer.polarity_scores(r)['compound'] for r in responses]


class RewardModelScorer(Scorer):
    """A sequence-classification reward model's score of prompt + response (right-padded batches): the dialogue and
    the response as an assistant message through the reward model's chat template, or without one the dialogue as
    HH-format text followed by the response (' ' + its text, as in HH)."""

    def __init__(self, spec: str, path: str, batch_size: int = 8, max_length: int = 1024, device: Optional[str] = None):
        super().__init__(spec)
        import transformers
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.tokenizer.eos_token_id
        self.tokenizer.padding_side = 'right'
        # a text longer than max_length loses its beginning (the start of a long dialogue), never the response scored
        self.tokenizer.truncation_side = 'left'
        self.device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels not in (1, 2):
            raise ValueError(f'judge={spec}: the model has {self.model.config.num_labels} outputs; a reward model has '
                             f'one (a score) or two (then logit 1 − logit 0 is the score)')
        self.batch_size, self.max_length = batch_size, max_length

    def texts(self, prompts: Sequence[JudgedPrompt], responses: Sequence[str]) -> List[str]:
        """What the reward model reads for each (prompt, response)."""
        if getattr(self.tokenizer, 'chat_template', None):
            return [self.tokenizer.apply_chat_template(dialogue(p) + [{'role': 'assistant', 'content': r.strip()}],
                                                       tokenize=False) for p, r in zip(prompts, responses)]
        return [plain_text(p) + hh_style_response(r) for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score(self, prompts, responses):
        scores = []
        texts = self.texts(prompts, responses)
        # a chat template writes its own BOS where the model expects one (transformers' apply_chat_template
        # tokenizes its text with add_special_tokens=False for that reason)
        add_special_tokens = not getattr(self.tokenizer, 'chat_template', None)
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start:start + self.batch_size], return_tensors='pt', padding=True,
                                    truncation=True, max_length=self.max_length,
                                    add_special_tokens=add_special_tokens).to(self.device)
            logits = self.model(**inputs).logits.float()
            scores += (logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).tolist()
        return scores


class LocalChatJudge(PairwiseJudge):
    """A local chat model answering DIALOGUE_PROMPT greedily, in batches."""

    def __init__(self, spec: str, path: str, max_new_tokens: int = 64, batch_size: int = 8,
                 max_prompt_length: int = 2048, device: Optional[str] = None):
        super().__init__(spec)
        from generation import load_model
        self.loaded = load_model(path, device=device)
        self.max_new_tokens, self.batch_size, self.max_prompt_length = max_new_tokens, batch_size, max_prompt_length

    def prompt_ids(self, queries: Sequence[JudgeQuery]) -> List[List[int]]:
        """The judge model's input for each query, within max_prompt_length (judge_prompt_ids)."""
        return [judge_prompt_ids(self.loaded.tokenizer, q, self.max_prompt_length) for q in queries]

    def verdict_texts(self, queries):
        from generation import generate
        ids = self.prompt_ids(queries)
        samples = generate(self.loaded, ids, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                           progress=len(ids) > self.batch_size)
        return [row[0].completion for row in samples]


class ApiJudge(PairwiseJudge):
    """MODEL behind an OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY from the environment),
    temperature 0, `concurrency` requests at a time. Reachability and the model are checked at construction,
    so a wrong address fails before anything is generated."""

    def __init__(self, spec: str, model: str, max_new_tokens: int = 64, concurrency: int = 8, timeout: float = 120.0):
        super().__init__(spec)
        import openai
        self.base_url = os.environ.get('OPENAI_BASE_URL') or 'https://api.openai.com/v1'
        if not os.environ.get('OPENAI_API_KEY'):
            raise ValueError(f'judge={spec}: set OPENAI_API_KEY in the environment (any value for a local server '
                             f'that ignores it) and OPENAI_BASE_URL for an endpoint other than api.openai.com')
        self.client = openai.OpenAI(base_url=self.base_url, timeout=timeout, max_retries=2)
        self.model, self.max_new_tokens, self.concurrency = model, max_new_tokens, concurrency
        self.check_endpoint(openai)

    def check_endpoint(self, openai) -> None:
        """One 1-token request: ValueError naming the endpoint if it cannot be reached, refuses the key or does not
        serve the model."""
        try:
            self.client.with_options(max_retries=0, timeout=60.0).chat.completions.create(
                model=self.model, messages=[{'role': 'user', 'content': 'Say A.'}], max_tokens=1, temperature=0)
        except openai.APIConnectionError as e:
            raise ValueError(f'judge={self.spec}: cannot reach the endpoint {self.base_url} ({type(e).__name__}); '
                             f'start the server or set OPENAI_BASE_URL to its address') from None
        except openai.AuthenticationError:
            raise ValueError(f'judge={self.spec}: {self.base_url} refused the key in OPENAI_API_KEY') from None
        except (openai.NotFoundError, openai.BadRequestError) as e:
            raise ValueError(f'judge={self.spec}: {self.base_url} does not serve the model {self.model!r} '
                             f'({type(e).__name__}: {str(e)[:200]})') from None

    def verdict_text(self, query: JudgeQuery) -> str:
        response = self.client.chat.completions.create(model=self.model,
                                                       messages=[{'role': 'user', 'content': query.text()}],
                                                       max_tokens=self.max_new_tokens, temperature=0)
        return response.choices[0].message.content or ''

    def verdict_texts(self, queries):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.verdict_text, queries))


def split_spec(spec: str) -> Tuple[str, str]:
    """('reward', 'PATH') of 'reward:PATH'; ('sentiment', '') of 'sentiment'."""
    kind, _, argument = str(spec).partition(':')
    return kind, argument


def judge_problems(spec) -> List[str]:
    """What is wrong with a judge spec, checked without loading anything (empty if nothing)."""
    kind, argument = split_spec(spec)
    if kind in ('gold', 'sentiment'):
        return [] if not argument else [f'judge={spec}: {kind} takes no argument (judge={kind})']
    if kind not in ('reward', 'llm', 'api'):
        return [f'judge={spec!r} is unknown; use {JUDGE_FORMS}']
    if not argument:
        return [f'judge={spec}: give the {"model name" if kind == "api" else "path"} after the colon, e.g. '
                f'{kind}:{"gpt-4" if kind == "api" else "/path/to/model"}']
    if kind == 'reward':
        config = Path(argument).expanduser() / 'config.json'
        if not config.is_file():
            return [f'judge={spec}: {argument} is not a Hugging Face model directory (no config.json)']
        import json
        architectures = json.loads(config.read_text()).get('architectures') or []
        if not any(a.endswith('ForSequenceClassification') for a in architectures):
            return [f'judge={spec}: {argument} is a {", ".join(architectures) or "model"}, not a sequence-'
                    f'classification reward model (…ForSequenceClassification)']
    if kind == 'llm':
        from generation import model_kind
        try:
            model_kind(argument)
        except ValueError as e:
            return [f'judge={spec}: {e}']
    return []


def make_judge(spec: str, max_new_tokens: int = 64, batch_size: int = 8, concurrency: int = 8,
               device: Optional[str] = None):
    """The judge of a spec (see the module docstring); ValueError for an unknown or unusable one."""
    problems = judge_problems(spec)
    if problems:
        raise ValueError(problems[0])
    kind, argument = split_spec(spec)
    if kind == 'gold':
        return GoldScorer(spec)
    if kind == 'sentiment':
        return SentimentScorer(spec)
    if kind == 'reward':
        return RewardModelScorer(spec, argument, batch_size, device=device)
    if kind == 'llm':
        return LocalChatJudge(spec, argument, max_new_tokens, batch_size, device=device)
    return ApiJudge(spec, argument, max_new_tokens, concurrency)
