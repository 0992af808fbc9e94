"""The api: judge against a real OpenAI-compatible server: `transformers serve` (transformers[serving]) started and
stopped by the test, serving a real chat model whose answer is always 'A' (tests/judge_models.py)."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from evaluate import evaluate
from eval_helpers import eval_config, save_letter_judge
from judges import make_judge
from distributed import get_open_port

pytestmark = pytest.mark.slow

HH_PROMPT = '\n\nHuman: How do I boil an egg?\n\nAssistant:'


def start_server(model_dir: Path, log_path: Path, timeout: float = 180):
    """(process, base URL) of `transformers serve MODEL_DIR` on a free port, once /health answers; skips the test
    with the server's last output where it cannot start (no serving extras, no free port, a crash)."""
    pytest.importorskip('fastapi', reason='transformers serve needs the serving extras (pip install transformers[serving])')
    pytest.importorskip('uvicorn', reason='transformers serve needs the serving extras (pip install transformers[serving])')
    port = get_open_port()
    log = open(log_path, 'w')
    process = subprocess.Popen([sys.executable, '-m', 'transformers.cli.transformers', 'serve', str(model_dir),
                                '--host', '127.0.0.1', '--port', str(port), '--device', 'cpu'],
                               stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false'))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.skip(f'transformers serve could not start (exit {process.returncode}): '
                        f'{log_path.read_text()[-500:]}')
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as response:
                if response.status == 200:
                    return process, f'http://127.0.0.1:{port}/v1'
        except OSError:
            time.sleep(0.5)
    process.kill()
    pytest.skip(f'transformers serve did not answer /health within {timeout} s: {log_path.read_text()[-500:]}')


@pytest.fixture(scope='module')
def served_letter_judge(tmp_path_factory):
    """(base URL, model name) of the always-'A' model behind a running `transformers serve`; stopped afterwards."""
    root = tmp_path_factory.mktemp('served')
    model_dir = save_letter_judge(root / 'judge_a', 'A', root)
    process, base_url = start_server(model_dir, root / 'serve.log')
    try:
        yield base_url, str(model_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def endpoint(served_letter_judge, monkeypatch):
    base_url, model = served_letter_judge
    monkeypatch.setenv('OPENAI_BASE_URL', base_url)
    monkeypatch.setenv('OPENAI_API_KEY', 'local-server-ignores-it')
    return model


def test_the_api_judge_answering_a_gives_one_half(endpoint):
    """Through the server, each of 3 pairs is judged in both orders (6 requests), the answer is 'A' every time, and
    every pair scores ½."""
    judge = make_judge(f'api:{endpoint}', concurrency=3)
    comparisons = judge.compare([HH_PROMPT] * 3, [' Boil it for nine minutes.', ' No.', ' Ask a chef.'],
                                [' No.', ' Boil it for nine minutes.', ' Hmm.'])
    assert [(c.verdict_response_first, c.verdict_response_second, c.score) for c in comparisons] == [('A', 'A', 0.5)] * 3


def test_a_model_the_server_does_not_serve_is_named(endpoint):
    with pytest.raises(ValueError, match=r"judge=api:gpt-4: http://127.0.0.1:\d+/v1 does not serve the model 'gpt-4'"):
        make_judge('api:gpt-4')


def test_evaluate_with_the_api_judge(endpoint, short_sft_run, tmp_path):
    """python evaluate.py judge=api:MODEL on 4 synthetic prompts at two temperatures: win rate 0.5 at each; neither
    the endpoint's address nor the key is written to results.json."""
    results = evaluate(eval_config([f'model={short_sft_run}', f'judge=api:{endpoint}', 'temperatures=[0,1]',
                                    'n_prompts=4', 'max_new_tokens=8', f'out={tmp_path / "out"}'], tmp_path))
    assert [t['win_rate'] for t in results['temperatures']] == [0.5, 0.5]
    written = (tmp_path / 'out' / 'results.json').read_text() + (tmp_path / 'out' / 'samples.jsonl').read_text()
    assert os.environ['OPENAI_BASE_URL'] not in written and 'local-server-ignores-it' not in written
