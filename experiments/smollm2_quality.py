"""What the 4-bit GGUF copy of SmolLM2-135M-Instruct costs, measured where it can be without the original weights.

    python experiments/smollm2_quality.py                       # after `make smollm2`; about 25 min on 1 CPU core
    python experiments/smollm2_quality.py --n-pairs 20 --threads 2 --out experiments/smollm2_quality.json

Prints (and writes as JSON with --out):
- the time of the first conversion of the GGUF file (models.py) and of a cached load (materialize_model +
  from_pretrained of model and tokenizer);
- the model's answer to "What is the capital of France?" through its chat template (greedy);
- held-out log-likelihood per token of the chosen responses of the first N pairs of the UltraFeedback test
  slice, chat-rendered and tokenized as training does them (preference_datasets.load_tokenized), for
    converted   the GGUF's weights dequantized to float32 (what model=smollm2 trains offline);
    + Q4_1      the same weights rounded to Q4_1 once more (gguf's own quantizer), on blocks of 32 shifted by 16
                along each row so the rounding is not undone by the original blocks: what one Q4_1 rounding
                of these weights costs, an estimate of what the copy lost against the original weights;
    + Q8_0      the same with Q8_0 (8-bit), a control: its rounding should cost almost nothing;
    + Q4_1 unshifted, on the GGUF's own blocks: a check of the block layout, which must give the copy back;
  with the mean per-pair difference against `converted` and its standard error;
- the same for the HH harmless-base test slice, in the HH text format (no template, EOS appended) and rendered
  through the chat template (render_hh_with_chat_template), for the converted model.
The full-precision model is not reachable offline, so the difference between the copy and the original
itself is not measured here; with the Hub, response_logps of AutoModelForCausalLM.from_pretrained(
'HuggingFaceTB/SmolLM2-135M-Instruct') on the same tokenized split would measure it.
"""
import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import data_sources as ds  # noqa: E402

import preference_datasets as pd  # noqa: E402
from models import SMOLLM2_GGUF, materialize_model  # noqa: E402

SHARED = REPO.parent / 'shared' / 'data'


def response_logps(model, split, n_pairs: int, batch_size: int = 4):
    """(sum of log-probabilities, number of tokens) of the chosen response of each of the first n_pairs examples."""
    sums, counts = [], []
    for start in range(0, min(n_pairs, split.n_examples), batch_size):
        rows = [(split.prompt_ids[e], split.chosen_ids[e]) for e in range(start, min(start + batch_size, n_pairs))]
        length = max(len(p) + len(c) for p, c in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        labels = torch.full((len(rows), length), -100)
        for i, (p, c) in enumerate(rows):
            seq = torch.from_numpy(np.concatenate([p, c]).astype(np.int64))
            ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
            labels[i, len(p):len(seq)] = seq[len(p):]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logps = logps * (targets != -100)
        sums.extend(logps.sum(-1).tolist())
        counts.extend((targets != -100).sum(-1).tolist())
    return np.array(sums), np.array(counts)


def summary(sums, counts, base=None):
    out = {'logp_per_token': float(sums.sum() / counts.sum()), 'tokens': int(counts.sum()), 'pairs': len(sums)}
    if base is not None:
        diff = sums / counts - base[0] / base[1]  # per pair, per token
        out['diff_vs_converted'] = float(diff.mean())
        out['diff_se'] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return out


def requantized(model, qtype_name: str, shift: int = 16):
    """A copy of `model` whose attention and MLP projections (the tensors the GGUF holds in Q4_1) are rounded to
    `qtype_name` by gguf's quantizer, on blocks shifted by `shift` along each row, and dequantized again."""
    import copy

    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    model = copy.deepcopy(model)
    for name, param in model.named_parameters():
        if name.endswith('proj.weight'):
            rows = np.roll(param.detach().numpy(), -shift, axis=-1)
            rounded = gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype)
            param.data.copy_(torch.from_numpy(np.roll(rounded, shift, axis=-1).reshape(param.shape)))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--n-pairs', type=int, default=100, help='pairs of each slice evaluated (from the start)')
    parser.add_argument('--max-length', type=int, default=512)
    parser.add_argument('--max-prompt-length', type=int, default=256)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch decides)')
    parser.add_argument('--out', type=Path, default=None, help='write the results as JSON here')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        path = materialize_model(str(SMOLLM2_GGUF), tmp)
        results['conversion_s'] = time.time() - start
        start = time.time()
        path = materialize_model(str(SMOLLM2_GGUF), tmp)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        results['cached_load_s'] = time.time() - start
        print(f"first conversion {results['conversion_s']:.1f} s, cached load {results['cached_load_s']:.1f} s", flush=True)

        inputs = tokenizer.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                               add_generation_prompt=True, return_tensors='pt', return_dict=True)
        output = model.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs['input_ids'].shape[1]:]
        results['capital_of_france'] = tokenizer.decode(output)
        print('What is the capital of France? ->', repr(results['capital_of_france']), flush=True)

        data = Path(tmp) / 'uf'
        data.mkdir()
        (data / 'test.jsonl.gz').symlink_to(SHARED / 'ultrafeedback' / 'test.messages.jsonl.gz')
        hh = Path(tmp) / 'hh'
        hh.mkdir()
        (hh / 'test.jsonl.gz').symlink_to(SHARED / 'hh-rlhf' / 'harmless-base-test.jsonl.gz')
        lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', ds.DataWarning)
            uf = pd.load_tokenized(str(data), tokenizer, 'test', silent=True, cache_dir=tmp, **lengths)
            hh_text = pd.load_tokenized(f'hh:{hh}', tokenizer, 'test', silent=True, cache_dir=tmp, **lengths)
            hh_chat = pd.load_tokenized(f'hh:{hh}', tokenizer, 'test', silent=True, cache_dir=tmp,
                                        dataset_options={'render_hh_with_chat_template': True}, **lengths)

        for label, split in (('hh_text_format', hh_text), ('hh_chat_template', hh_chat)):
            start = time.time()
            results[label] = summary(*response_logps(model, split, args.n_pairs))
            print(label, results[label], f'{time.time() - start:.0f} s', flush=True)
        start = time.time()
        base = response_logps(model, uf, args.n_pairs)
        results['ultrafeedback_converted'] = summary(*base)
        print('ultrafeedback_converted', results['ultrafeedback_converted'], f'{time.time() - start:.0f} s', flush=True)
        for qtype, shift in (('Q4_1', 0), ('Q8_0', 16), ('Q4_1', 16)):
            start = time.time()
            label = f'ultrafeedback_plus_{qtype}_shift{shift}'
            results[label] = summary(*response_logps(requantized(model, qtype, shift), uf, args.n_pairs), base)
            print(label, results[label], f'{time.time() - start:.0f} s', flush=True)
    results['settings'] = vars(args) | {'out': str(args.out), 'torch_threads': torch.get_num_threads()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
    main()
