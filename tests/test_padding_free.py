"""padding_free=true (logps.pack_sequences / packed_logps): the packed forward pass gives the padded one's
log-probabilities, losses, β-DPO decisions and gradients; sequences in a row do not see each other; models whose
attention ignores packed position_ids are refused."""
import json

import pytest
import torch
import transformers

import preference_datasets as pd
from helpers import FAST, start_run
from logps import check_packing, concatenated_logps, forward_logps, pack_sequences
from utils import UserError


def tiny(kind: str, vocab: int):
    configs = {'neox': transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4),
               'llama': transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
               'gpt2': transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=0)}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[kind]).eval()


def test_pack_sequences_layout():
    """First fit: lengths 3, 4, 2 into rows of 6 -> [seq0, seq2] and [seq1]; positions restart, first labels −100."""
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11], [12, 13, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    packed = pack_sequences(ids, mask, labels, 6)
    assert packed['input_ids'].tolist() == [[5, 6, 7, 12, 13], [8, 9, 10, 11, 0]]
    assert packed['position_ids'].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert packed['labels'].tolist() == [[-100, 6, 7, -100, 13], [-100, 9, 10, 11, -100]]
    assert packed['sequence'].tolist() == [[0, 0, 0, 2, 2], [1, 1, 1, 1, -1]]


@pytest.mark.parametrize('kind', ['neox', 'llama'])
def test_a_sequence_never_sees_its_row_neighbours(kind):
    """Changing every token of one sequence moves its own log-probability, never the others' in its row."""
    model = tiny(kind, 64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        before = forward_logps(model, ids, mask, labels, 16, pack_tokens=36)
        changed = ids.clone()
        changed[2] = (changed[2] + 7) % 63 + 1
        after = forward_logps(model, changed, mask, labels.where(labels == -100, changed), 16, pack_tokens=36)
    assert pack_sequences(ids, mask, labels, 36)['input_ids'].shape[0] == 1  # all four share one row
    assert (after[2] - before[2]).abs() > 1e-3
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]], rtol=1e-6, atol=1e-6)


def real_batch(name, tokenizer, tmp_path, n=8):
    return next(pd.get_batch_iterator([name], tokenizer, 'test', batch_size=n, shuffle=True, max_length=512,
                                      max_prompt_length=256, n_epochs=1, seed=3, silent=True, cache_dir=str(tmp_path)))


def assert_packed_equals_padded(model, batch, chunk_size):
    results = []
    for pack in (None, 512):
        model.zero_grad()
        chosen, rejected = concatenated_logps(model, batch, chunk_size, pack_tokens=pack)
        (chosen - 0.5 * rejected).sum().backward()
        results.append((chosen.detach(), rejected.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (c0, r0, g0), (c1, r1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-4)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('chunk_size', [pytest.param(None, marks=pytest.mark.slow), 2048])
def test_real_hh_packed_equals_padded(neox_tokenizer, hh_slice_dir, tmp_path, chunk_size):
    """8 real HH pairs (GPT-NeoX tokenizer), a tiny GPT-NeoX of its vocabulary: the same chosen/rejected
    log-probabilities and gradients packed as padded, with the full logits and with the chunked head."""
    batch = real_batch(f'hh:{hh_slice_dir}', neox_tokenizer, tmp_path)
    assert_packed_equals_padded(tiny('neox', 50304), batch, chunk_size)


def test_ultrafeedback_smollm2_packed_equals_padded(smollm2_tokenizer, ultrafeedback_messages, tmp_path):
    """8 UltraFeedback message pairs, SmolLM2's tokenizer and a tiny Llama of its vocabulary."""
    batch = real_batch(str(ultrafeedback_messages), smollm2_tokenizer, tmp_path)
    assert_packed_equals_padded(tiny('llama', len(smollm2_tokenizer)), batch, 2048)


@pytest.mark.parametrize('loss', [['loss=sft'], ['loss=dpo', 'loss.beta=0.1'],
                                  ['loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO', 'loss.mode_weight=0.25'],
                                  pytest.param(['loss=dpo', 'loss.beta=0.1', 'activation_checkpointing=true',
                                                'precompute_ref_log_probs=true'], marks=pytest.mark.slow)])
def test_trainer_packed_equals_padded(tmp_path, loss):
    """One training batch through BasicTrainer.get_batch_metrics: the same loss, metrics (log-probabilities, β used,
    pairs kept) and gradients with padding_free=true as without; also with activation checkpointing and the
    precomputed reference (whose pass packs too)."""
    outcomes = []
    batch = None
    for packed in ('false', 'true'):
        trainer = start_run([*FAST, *loss, f'padding_free={packed}'], tmp_path / packed)
        batch = batch or next(iter(trainer.train_batches()))
        trainer.policy.zero_grad()
        value, metrics = trainer.get_batch_metrics(batch, train=True)
        value.backward()
        outcomes.append((value.detach(), metrics, {n: p.grad.clone() for n, p in trainer.policy.named_parameters()
                                                   if p.grad is not None}))
    (l0, m0, g0), (l1, m1, g1) = outcomes
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m0.keys()
    for key in m0:
        assert m1[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-5), key
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


class IgnoresPositionIds(transformers.GPTNeoXForCausalLM):
    """A model whose forward drops position_ids (as one without packed-sequence support would)."""
    def forward(self, *args, position_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


def test_a_model_ignoring_position_ids_is_refused_naming_its_model_type():
    """Measured, not listed: a model whose attention lets packed sequences see each other is refused (UserError,
    exit 2); GPT-2 (absolute positions), GPT-NeoX and Llama pass the same probe."""
    torch.manual_seed(0)
    broken = IgnoresPositionIds(tiny('neox', 64).config).eval()
    with pytest.raises(UserError, match="padding_free=true: model type 'gpt_neox' does not keep packed sequences"):
        check_packing(broken, torch.device('cpu'))
    for kind in ('gpt2', 'neox', 'llama'):
        check_packing(tiny(kind, 64), torch.device('cpu'))


def test_tensor_parallel_is_refused(tmp_path):
    from config_schema import cross_field_problems
    from helpers import compose_config
    config = compose_config(['trainer=TensorParallelTrainer', 'padding_free=true'], tmp_path)
    assert any(p.startswith('padding_free=true is not supported with trainer=TensorParallelTrainer')
               for p in cross_field_problems(config, None))


# 4 SGD steps of 8 β-DPO pairs from the embedded model (2 ranks: 4 pairs each), evaluated and saved after 2
PACKED_BETA_DPO = [*FAST, 'optimizer=SGD', 'lr=0.01', 'max_grad_norm=10', 'n_examples=32', 'eval_every=16',
                   'minimum_log_interval_secs=0', 'loss=dpo', 'loss.beta=0.1', 'loss.mode_loss=beta_DPO',
                   'loss.mode_weight=0.2', 'loss.a=0.6', 'padding_free=true']


def fsdp_worker(rank, world_size, port, tmp):
    from torch.distributed.tensor import DTensor
    import trainers
    from distributed import init_distributed
    from helpers import compose_config
    from train import build_run_models, prepare_run
    setup = init_distributed(rank, world_size, port)
    config = compose_config([*PACKED_BETA_DPO, 'trainer=FSDPTrainer', 'n_cpu_processes=2',
                             f'local_run_dir={tmp / "fsdp"}'], tmp)
    policy, reference = build_run_models(config, prepare_run(config), setup)
    trainer = trainers.FSDPTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference,
                                   rank=setup.rank, world_size=setup.world_size, device=setup.device)
    del policy, reference
    trainer.train()
    sharded = all(isinstance(p, DTensor) for group in trainer.optimizer.param_groups for p in group['params'])
    (tmp / f'sharded_rank{rank}.json').write_text(json.dumps(sharded))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_packed_equals_basic_trainer_packed(tmp_path):
    """2 gloo processes of FSDPTrainer with padding_free=true train as BasicTrainer packed does: per step the same
    loss, β used, pairs kept and gradient norm (float32, rel 1e-4), through an evaluation and a checkpoint after
    step 2; the optimizer holds only sharded (DTensor) parameters. Before FSDPTrainer.check_packing resharded the
    root after its probe forward, the optimizer got the root's unsharded tensors and the checkpoint ended in a SIGSEGV."""
    import torch.multiprocessing as mp
    from distributed import get_open_port
    from helpers import compose_config
    from train import build_run_models, prepare_run, run_trainer
    config = compose_config([*PACKED_BETA_DPO, f'local_run_dir={tmp_path / "basic"}'], tmp_path)
    parallelism = prepare_run(config)
    run_trainer(config, parallelism, *build_run_models(config, parallelism))
    mp.spawn(fsdp_worker, args=(2, get_open_port(), tmp_path), nprocs=2, join=True)

    def train_metrics(name):
        return [m for m in map(json.loads, (tmp_path / name / 'metrics.jsonl').read_text().splitlines())
                if m['split'] == 'train']
    basic, fsdp = train_metrics('basic'), train_metrics('fsdp')
    assert len(basic) == len(fsdp) == 4
    assert basic[0]['loss/train'] == pytest.approx(0.693147, abs=1e-5)
    assert basic[3]['loss/train'] != pytest.approx(basic[0]['loss/train'], abs=1e-4)
    for key in ('loss/train', 'record_train/beta_used', 'record_train/mask_count', 'grad_norm'):
        assert [m[key] for m in fsdp] == pytest.approx([m[key] for m in basic], rel=1e-4), key
    assert [json.loads((tmp_path / f'sharded_rank{r}.json').read_text()) for r in (0, 1)] == [True, True]
    assert (tmp_path / 'fsdp' / 'LATEST' / 'policy.pt').exists()


def test_padding_fraction_reports_the_packed_layout(tmp_path):
    """Chosen lengths 3, 5 (width 5) and rejected 2, 4 (width 4): padded, 4 rows × 5 = 20 tokens for 14 real, 0.3;
    packed first fit into rows of 6: [3, 2], [5], [4] -> 3 rows × 5 = 15, 1/15; rows of 14: one row of 14, 0."""
    def mask(lengths, width):
        return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    batch = {'chosen_attention_mask': mask([3, 5], 5), 'rejected_attention_mask': mask([2, 4], 4)}
    assert pd.padding_counts(batch) == (6, 20)
    assert pd.padding_fraction(batch) == pytest.approx(0.3)
    assert pd.padding_counts(batch, 6) == (1, 15)
    assert pd.padding_fraction(batch, 14) == 0


@pytest.mark.slow
def test_the_trainer_logs_the_padding_of_the_layout_it_computes(tmp_path):
    """padding/fraction of a step: the padded layout's share, or with padding_free=true its packed rows'."""
    for packed in ('false', 'true'):
        trainer = start_run([*FAST, 'loss=dpo', 'loss.beta=0.1', f'padding_free={packed}'], tmp_path / packed)
        real = next(iter(trainer.train_batches()))
        expected = pd.padding_fraction(real, trainer.config.max_length if packed == 'true' else None)
        assert trainer.padding_fraction(trainer.microbatches(real)) == pytest.approx(expected)
        assert trainer.train_step(real)['padding/fraction'] == pytest.approx(expected)
