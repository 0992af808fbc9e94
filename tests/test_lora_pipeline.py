"""LoRA end to end: SFT with LoRA, then β-DPO with LoRA from its archive through `python train.py`, then a full DPO
from that β-DPO archive (a chain of two adapters); a LoRA run resumed from its checkpoint; the precomputed reference.

The handoff is checked by value: a run that starts from an archive evaluates, before its first step, exactly what
the archive's run evaluated after its last one (the same held-out pairs, the same weights), and that is also what
the archive's merged hf_model/ computes, and what generation.py (evaluate.py, sample_pairs.py) loads from the run.
"""
import json
import math

import pytest
import torch

from transformers import AutoModelForCausalLM

from generation import load_model
from helpers import FAST, compose_config, run_dir_from_output, run_train, train_in_process
from train import build_run_models, prepare_run
from trainers import BasicTrainer

pytestmark = pytest.mark.slow

# 4 steps of 8 examples, evaluated and saved at 16 and 32; lr large enough for the adapters to move the log-probs
COMMON = [*FAST, 'n_examples=32', 'eval_every=16', 'minimum_log_interval_secs=0', 'optimizer=AdamW']
LORA = ['lora.r=4', 'lora.alpha=8']
BETA_DPO = ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.2', 'loss.a=0.6']


def metrics(run_dir, split):
    return [m for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines()) if m['split'] == split]


def test_sft_lora_then_beta_dpo_lora_then_full_dpo(tmp_path):
    """SFT (LoRA, lr 3e-2) moves the held-out chosen log-probability; β-DPO (LoRA) from its policy.pt starts there:
    its first evaluation's logps_eval/chosen equals the SFT run's last (1e-4 relative) and its first loss is ln 2.
    Its policy.pt holds its adapters and the SFT archive it stands on. A full-weight DPO (lora.r=0) from the β-DPO
    archive merges both adapters, SFT's then β-DPO's, and starts where β-DPO ended."""
    sft_output = run_train([*COMMON, *LORA, 'loss=sft', 'lr=3e-2', f'local_dirs=[{tmp_path}]', 'exp_name=sft'],
                           cwd=tmp_path)
    sft = run_dir_from_output(sft_output.stdout)
    sft_evals = metrics(sft, 'eval')
    assert abs(sft_evals[-1]['logps_eval/chosen'] - sft_evals[0]['logps_eval/chosen']) > 1.0

    archive = f'model.archive={sft}/LATEST/policy.pt'
    dpo = run_dir_from_output(run_train([*COMMON, *LORA, *BETA_DPO, 'lr=1e-2', archive, f'local_dirs=[{tmp_path}]',
                                         'exp_name=dpo'], cwd=tmp_path).stdout)
    dpo_evals = metrics(dpo, 'eval')
    assert dpo_evals[0]['logps_eval/chosen'] == pytest.approx(sft_evals[-1]['logps_eval/chosen'], rel=1e-4)
    assert metrics(dpo, 'train')[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(dpo_evals[-1]['rewards_eval/logratio_margins']) > 1e-3
    saved = torch.load(dpo / 'LATEST' / 'policy.pt', weights_only=True)
    assert all('.lora_' in key for key in saved['state'])
    assert saved['lora']['base_archive'] == str((sft / 'LATEST' / 'policy.pt').resolve())
    # generation.py (evaluate.py, sample_pairs.py) reads the run's policy.pt: both adapters merged = hf_model/
    input_ids = torch.tensor([list(b'\n\nHuman: reverse cab\n\nAssistant: bac')])
    with torch.no_grad():
        from_run = load_model(str(dpo), device='cpu').model(input_ids).logits
        exported = AutoModelForCausalLM.from_pretrained(dpo / 'hf_model')(input_ids).logits
    torch.testing.assert_close(from_run, exported, rtol=0, atol=1e-5)

    full = train_in_process([*COMMON, 'loss=dpo', 'loss.beta=0.1', 'lr=1e-4', f'model.archive={dpo}/LATEST/policy.pt',
                             'exp_name=full', 'n_examples=8', 'eval_every=8'], tmp_path)
    assert metrics(full, 'eval')[0]['logps_eval/chosen'] == pytest.approx(dpo_evals[-1]['logps_eval/chosen'], rel=1e-4)
    assert metrics(full, 'train')[0]['loss/train'] == pytest.approx(math.log(2), abs=1e-6)
    assert len(torch.load(full / 'LATEST' / 'policy.pt', weights_only=True)['state']) == 52  # every weight


def without_time(lines):
    return [{k: v for k, v in line.items() if k != 'examples_per_second'} for line in lines]


def test_a_lora_run_resumed_from_its_checkpoint_continues_exactly(tmp_path):
    """β-DPO with LoRA for 16 examples, then resumed to 32: its metrics are bitwise those of a run of 32 (adapters,
    AdamW state and β-DPO statistics come back from the small checkpoint; the base weights from the model)."""
    args = [*COMMON, *LORA, *BETA_DPO, 'lr=1e-2', 'do_first_eval=false']
    whole = train_in_process([*args, 'exp_name=whole'], tmp_path)
    half = train_in_process([*args, 'exp_name=half', 'n_examples=16'], tmp_path)
    resumed = train_in_process([*args, 'exp_name=half', f'resume_from={half}'], tmp_path)
    assert resumed == half
    logged = lambda run: without_time(map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()))
    assert logged(resumed) == logged(whole)


def three_step_losses(tmp_path, overrides):
    config = compose_config([*FAST, *LORA, 'loss=dpo', 'loss.beta=0.1', 'n_examples=24', 'optimizer=SGD', 'lr=0.5',
                             *overrides], tmp_path)
    parallelism = prepare_run(config)
    policy, reference = build_run_models(config, parallelism)
    assert reference is None
    trainer = BasicTrainer(policy, config, config.seed, config.local_run_dir)
    trainer.start()
    return [trainer.train_step(batch)['loss/train'] for batch in trainer.train_batches()], trainer


def test_precomputed_reference_with_lora(tmp_path):
    """3 SGD steps of DPO with LoRA: with the reference precomputed (the policy with its adapters off, before
    training) the losses equal those with the reference computed in each step (ln 2 first, then apart from it), and
    the cache holds the 24 training and 8 evaluation pairs, keyed by the policy's dtype."""
    in_step, _ = three_step_losses(tmp_path / 'in_step', [])
    precomputed, trainer = three_step_losses(tmp_path / 'precomputed', ['precompute_ref_log_probs=true'])
    assert precomputed == pytest.approx(in_step, rel=1e-5)
    assert in_step[0] == pytest.approx(math.log(2), abs=1e-6) and abs(in_step[2] - math.log(2)) > 1e-3
    assert trainer.reference.model is None and len(trainer.reference.cache) == 32
    assert trainer.reference_cache_file().exists()
