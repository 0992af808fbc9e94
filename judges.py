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
                 its logit; two: logit 1 − logit 0, the log-odds of label 1)
    llm:PATH     pairwise: a local chat model (any source generation.load_model reads) asked the DPO paper's
                 GPT-4 dialogue prompt, greedy
    api:MODEL    pairwise: the same prompt to MODEL behind an OpenAI-compatible endpoint (the paper's protocol
                 with GPT-4, or a local server such as `transformers serve`): OPENAI_BASE_URL and OPENAI_API_KEY
                 are read from the environment only and never written anywhere

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
from typing import List, Optional, Sequence, Tuple

import torch

from synthetic_task import synthetic_gold_answer, synthetic_instruction
from utils import ASSISTANT

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


def dialogue_query(prompt: str) -> str:
    """The query shown to a pairwise judge: the prompt without the final '\\n\\nAssistant:' it ends with."""
    return (prompt[:-len(ASSISTANT)] if prompt.endswith(ASSISTANT) else prompt).strip()


class Scorer:
    """A judge that scores each response alone."""
    pairwise = False

    def __init__(self, spec: str):
        self.spec = spec

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        raise NotImplementedError


class PairwiseJudge:
    """A judge that says which of two responses is better; subclasses answer `verdict_texts`."""
    pairwise = True

    def __init__(self, spec: str):
        self.spec = spec

    def verdict_texts(self, queries: Sequence[str]) -> List[str]:
        """The judge's answer to each filled-in DIALOGUE_PROMPT."""
        raise NotImplementedError

    def compare(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str]) -> List[Comparison]:
        """Each response against its reference, judged in both orders (see the module docstring)."""
        queries = []
        for prompt, response, reference in zip(prompts, responses, references):
            query = dialogue_query(prompt)
            queries.append(DIALOGUE_PROMPT.format(query=query, a=response.strip(), b=reference.strip()))
            queries.append(DIALOGUE_PROMPT.format(query=query, a=reference.strip(), b=response.strip()))
        verdicts = [parse_verdict(text) for text in self.verdict_texts(queries)]
        return [comparison(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(responses))]


class GoldScorer(Scorer):
    """1.0 for the synthetic task's gold answer (surrounding whitespace ignored), else 0.0."""

    def score(self, prompts, responses):
        return [float(r.strip() == synthetic_gold_answer(p)) for p, r in zip(prompts, responses)]

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
    """A sequence-classification reward model's score of prompt + response (right-padded batches)."""

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

    @torch.no_grad()
    def score(self, prompts, responses):
        scores = []
        texts = [p + r for p, r in zip(prompts, responses)]
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(texts[start:start + self.batch_size], return_tensors='pt', padding=True,
                                    truncation=True, max_length=self.max_length).to(self.device)
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

    def verdict_texts(self, queries):
        from generation import Prompt, encode_prompts, generate
        tokenizer = self.loaded.tokenizer
        chat = bool(getattr(tokenizer, 'chat_template', None))
        texts = [tokenizer.apply_chat_template([{'role': 'user', 'content': q}], tokenize=False,
                                               add_generation_prompt=True) if chat else q + '\n' for q in queries]
        ids = encode_prompts(tokenizer, [Prompt(t, '', 'judge', chat) for t in texts], self.max_prompt_length)
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

    def verdict_text(self, query: str) -> str:
        response = self.client.chat.completions.create(model=self.model, messages=[{'role': 'user', 'content': query}],
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
