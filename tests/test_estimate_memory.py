"""benchmarks/estimate_memory.py against the measured peak of the same training step on CPU (small shapes).

The measurement: torch.distributed._tools.mem_tracker.MemTracker (PyTorch's own tracker of every tensor allocated,
by kind) around the second BasicTrainer step of a DPO run (the first creates the optimizer state), every sequence
max_length tokens long as the estimate assumes. The estimate: the same overrides, n_gpus=1. The reference log-probabilities are precomputed in both.
"""
import json
import random
import string
import sys

import pytest
import torch

from helpers import ROOT, compose_config

sys.path.insert(0, str(ROOT / 'benchmarks'))
import estimate_memory  # noqa: E402

PROMPT, RESPONSE = 64, 64  # tokens (bytes of the byte-level tokenizer)


def write_model_and_data(tmp_path, hidden, layers, vocab):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from models import build_byte_tokenizer
    tokenizer = build_byte_tokenizer()
    model_dir, data_dir = tmp_path / 'model', tmp_path / 'data'
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                           intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=256,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, attention_dropout=0.0,
                           hidden_dropout=0.0)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    text = lambda n: ''.join(rng.choice(string.ascii_lowercase) for _ in range(n))  # noqa: E731
    data_dir.mkdir()
    for split, n in (('train', 32), ('test', 8)):
        rows = [{'prompt': '\n\nHuman: ' + text(PROMPT - 21) + '\n\nAssistant:', 'chosen': ' ' + text(RESPONSE - 2),
                 'rejected': ' ' + text(RESPONSE - 2)} for _ in range(n)]
        (data_dir / f'{split}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return model_dir, data_dir


def measured_peak(overrides, tmp_path):
    """Bytes at the peak of the second training step: MemTracker's peak with the policy and the optimizer tracked. The
    reference log-probabilities are precomputed (MemTracker's hooks fail on a forward without gradients); the
    reference model's own bytes are arithmetic (its parameters in model.reference_dtype, or none once precomputed)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    import train
    import trainers
    config = compose_config(overrides, tmp_path)
    parallelism = train.prepare_run(config)
    policy, reference = train.build_run_models(config, parallelism)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference)
    trainer.setup_optimization()
    trainer.precompute_reference_logps()
    batches = iter(trainer.train_batches())
    trainer.train_step(next(batches))
    batch = next(batches)
    assert batch['chosen_input_ids'].shape[1] == PROMPT + RESPONSE  # every sequence max_length long
    tracker = MemTracker()
    tracker.track_external(trainer.policy, trainer.optimizer)
    with tracker:
        trainer.train_step(batch)
    return tracker.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']


@pytest.mark.slow
@pytest.mark.parametrize('shape, extra', [
    ((128, 2, 4096), []),
    ((256, 4, 2048), ['activation_checkpointing=true']),
    ((256, 2, 8192), ['logps_chunk_size=64'])])
def test_estimate_is_within_15_percent_of_the_measured_peak(tmp_path, shape, extra):
    """A DPO step of 8 pairs of 128 tokens (RMSprop, float32) on GPT-NeoX models of hidden 128-256, 2-4 layers and
    vocabularies 2,048-8,192, with and without activation checkpointing and with a small head chunk: the estimate's
    peak is within 15% of MemTracker's."""
    model_dir, data_dir = write_model_and_data(tmp_path, *shape)
    overrides = ['exp_name=estimate', 'model=blank_model_fp32', f'model.name_or_path={model_dir}', 'model.block_name=GPTNeoXLayer',
                 f'datasets=[{data_dir}]', 'loss=dpo', 'loss.beta=0.1', 'batch_size=8', 'eval_batch_size=8',
                 'n_eval_examples=8', 'n_examples=16', 'precompute_ref_log_probs=true', f'max_length={PROMPT + RESPONSE}',
                 f'max_prompt_length={PROMPT}', 'wandb.enabled=false', 'sample_during_eval=false', 'warmup_steps=0',
                 *extra]
    measured = measured_peak(overrides, tmp_path)
    estimate = estimate_memory.estimate(compose_config(overrides, tmp_path), n_gpus=1, gpu_memory_gib=80)
    estimated = estimate['peak_gib_per_gpu'] * 2 ** 30
    print(f'{shape} {extra}: measured {measured / 2 ** 20:.1f} MiB, estimated {estimated / 2 ** 20:.1f} MiB '
          f'({estimated / measured - 1:+.1%}); parts {estimate["parts_gib"]}')
    assert estimated == pytest.approx(measured, rel=0.15)


def test_fsdp_gradient_sync_choices_cost_the_unsharded_float32_gradients(tmp_path):
    """The README's Pythia-2.8B β-DPO run on 4 GPUs (accumulation 2): each choice of fsdp_gradient_sync reports the
    other's peak, and `step` costs what it holds between microbatches, the gradients unsharded in float32 (4 bytes per
    parameter) instead of one quarter of them (the peak is at the start of the last microbatch's backward pass)."""
    run = ['model=pythia28', 'loss=dpo', 'loss.mode_loss=beta_DPO', 'trainer=FSDPTrainer', 'batch_size=64',
           'gradient_accumulation_steps=2', 'model.fsdp_policy_mp=bfloat16']
    step, microbatch = (estimate_memory.estimate(compose_config([*run, f'fsdp_gradient_sync={sync}'], tmp_path),
                                                 n_gpus=4, gpu_memory_gib=80) for sync in ('step', 'microbatch'))
    assert step['peak_gib_if_fsdp_gradient_sync_microbatch'] == microbatch['peak_gib_per_gpu']
    assert microbatch['peak_gib_if_fsdp_gradient_sync_step'] == step['peak_gib_per_gpu']
    parameters = step['parameters_total']
    assert parameters == pytest.approx(2.78e9, rel=0.01)
    assert step['peak_gib_per_gpu'] - microbatch['peak_gib_per_gpu'] == pytest.approx(
        parameters * 4 * (1 - 1 / 4) / 2 ** 30, abs=0.01)
