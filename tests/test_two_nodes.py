"""Two nodes without a shared disk, on one machine: `torchrun --nnodes 2 --nproc_per_node 1` twice, with a c10d
rendezvous on 127.0.0.1, each "node" with its own working directory, local_dirs and copy of the data. The second
node runs in its own mount namespace where the first node's directory is an empty tmpfs (`unshare -m`, root only;
elsewhere it only has its own working directory), so a read of rank 0's disk from rank 1 fails as on a real second
node. All paths are relative to the node's working directory: the SFT archive and the run directory (runs/...)
exist on the first node only.

SFT (2 steps) → β-DPO with FSDPTrainer (2 steps, checkpoint), resumed for 2 more steps; the per-step losses equal
the one-node 2-process run's (train.py trainer=FSDPTrainer n_cpu_processes=2), the resumed run continuing exactly.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from distributed import get_open_port
from helpers import FAST, ROOT, TRAIN_ENV

pytestmark = pytest.mark.slow

COMMON = [*FAST, 'trainer=FSDPTrainer', 'datasets=[data]', 'local_dirs=[local]', 'optimizer=RMSprop', 'lr=1e-4',
          'eval_every=16', 'n_eval_examples=8', 'minimum_log_interval_secs=0', 'max_length=64', 'max_prompt_length=32']
SFT = ['loss=sft', 'n_examples=16', 'local_run_dir=runs/sft']
BETA_DPO = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6',
            'model.archive=runs/sft/LATEST/policy.pt', 'local_run_dir=runs/beta_dpo']


def write_data(directory: Path) -> None:
    """32 training and 8 test pairs in the generic prompt/chosen/rejected form (HH's dialogue markers)."""
    directory.mkdir(parents=True)
    for split, n in (('train', 32), ('test', 8)):
        rows = [{'prompt': f'\n\nHuman: what is {i} plus {i}?\n\nAssistant:', 'chosen': f' {2 * i}.',
                 'rejected': f' {2 * i + 1}, I think.'} for i in range(n)]
        (directory / f'{split}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))


def can_hide_directories() -> bool:
    return shutil.which('unshare') is not None and subprocess.run(
        ['unshare', '-m', 'true'], capture_output=True).returncode == 0


def two_nodes(nodes, args, hide):
    """train.py ARGS under torchrun on both nodes at once (node 0 is rank 0: torchrun orders the rendezvous's nodes
    by --local-addr); returns node 0's output. hide: node 1 cannot see node 0's directory."""
    rendezvous = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint',
                  f'127.0.0.1:{get_open_port()}', '--rdzv_id', uuid.uuid4().hex[:8], '--max_restarts', '0']
    processes = []
    for index, node in enumerate(nodes):
        command = [sys.executable, '-m', 'torch.distributed.run', *rendezvous, '--local-addr', f'127.0.0.{index + 1}',
                   str(ROOT / 'train.py'), *COMMON, *args]
        if index == 1 and hide:
            command = ['unshare', '-m', 'sh', '-c', f'mount -t tmpfs none "{nodes[0]}" && exec "$@"', 'sh', *command]
        processes.append(subprocess.Popen(command, cwd=node, env=dict(os.environ, **TRAIN_ENV),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    failed = [index for index, process in enumerate(processes) if process.returncode != 0]
    assert not failed, f'train.py {" ".join(args)}\n' + '\n'.join(f'node {index}:\n{outputs[index][-4000:]}'
                                                                    for index in reversed(failed))
    return outputs[0]


def losses(run_dir: Path):
    return [m['loss/train'] for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())
            if m['split'] == 'train']


def one_node(directory: Path, args):
    result = subprocess.run([sys.executable, str(ROOT / 'train.py'), *COMMON, 'n_cpu_processes=2', *args],
                            cwd=directory, env=dict(os.environ, **TRAIN_ENV), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_two_nodes_without_a_shared_disk_train_checkpoint_and_resume_as_one(tmp_path):
    """SFT losses (2 steps) and β-DPO losses (4 steps: 2, a checkpoint at 16 examples, then 2 resumed from it) of
    the two-node run equal the one-node run's within 1e-4 relative; the first β-DPO loss is ln 2 = 0.693147. Node 1
    never holds a run directory, an archive or a checkpoint: its runs/ does not exist afterwards."""
    single, nodes = tmp_path / 'single', [tmp_path / 'node0', tmp_path / 'node1']
    for directory in (single, *nodes):
        write_data(directory / 'data')
    hide = can_hide_directories()

    one_node(single, SFT)
    one_node(single, [*BETA_DPO, 'n_examples=32'])

    two_nodes(nodes, SFT, hide)
    two_nodes(nodes, [*BETA_DPO, 'n_examples=16'], hide)
    two_nodes(nodes, [*BETA_DPO, 'n_examples=32', 'resume_from=runs/beta_dpo'], hide)

    node0 = nodes[0] / 'runs'
    assert losses(node0 / 'sft') == pytest.approx(losses(single / 'runs' / 'sft'), rel=1e-4)
    assert len(losses(node0 / 'sft')) == 2
    resumed = losses(node0 / 'beta_dpo')
    assert len(resumed) == 4 and resumed[0] == pytest.approx(math.log(2), abs=1e-5)
    assert resumed == pytest.approx(losses(single / 'runs' / 'beta_dpo'), rel=1e-4)
    assert sorted(p.name for p in (node0 / 'beta_dpo').glob('step-*')) == ['step-16', 'step-32']
    assert not (nodes[1] / 'runs').exists()
