#!/usr/bin/env bash
# The checks that need a CUDA GPU, unattended, in one call of at most 10 minutes on a machine without network (the lent
# H200: Python 3.12, torch 2.11, transformers 5.17; no SmolLM2, no ../shared):
#   bash benchmarks/gpu_check.sh prepare     # here, with network: wheels and the HH slice into .gpu_check/ (ignored, ~2 MB)
#   bash benchmarks/gpu_check.sh [OUT]       # there: the device tool's run, carry=[".gpu_check"], timeout_s=600
#   CPU=1 bash benchmarks/gpu_check.sh       # here: the same steps on CPU, small shapes (a check of the script only)
# The run installs the carried wheels (hydra-core, omegaconf, antlr4 runtime: the packages the image lacks) into
# /tmp/site, then:
#   1. a Pythia-160M-shaped GPT-NeoX (random weights, byte-level tokenizer) built there; 4 SFT steps and 4 β-DPO steps
#      on the HH harmless slice under BasicTrainer (one GPU, bfloat16 weights) and 4 β-DPO steps under FSDPTrainer
#      (bfloat16 compute over float32 shards), both from the random model with a bfloat16 reference, so the first β-DPO
#      loss is ln 2 (policy = reference). Checks: finite losses, ln 2, BasicTrainer = FSDPTrainer on the first 2 steps
#      (within 2%: bfloat16 weights against bfloat16 compute of float32 shards).
#   2. benchmarks/gpu_mfu.py --memory: a Pythia-1.4B-shaped β-DPO step's time and MFU under both trainers (MFU over the
#      GPUs used × the dense bfloat16 peak), and torch.cuda.max_memory_allocated of a BasicTrainer run against
#      benchmarks/estimate_memory.py (check: within 25%).
# No checkpoint outlives its run (each run directory's step-*/ and hf_model/ are deleted once read). Exit status 0 only if
# every check passed; OUT/summary.json (OUT default $OUT of the device tool, else /tmp/gpu_check) holds the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu_check

if [ "${1:-}" = prepare ]; then
  grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> "$(git rev-parse --git-path info/exclude)"
  mkdir -p "$KIT/wheels"
  PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$KIT/wheels")
  "${PIP[@]}" hydra-core==1.3.8 omegaconf==2.3.0
  # antlr4-python3-runtime 4.9.3 (omegaconf's pin) is published as a source archive only: a pure-Python wheel built here
  python3 -m pip wheel -q --no-deps -w "$KIT/wheels" antlr4-python3-runtime==4.9.3
  cp "${HH:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}" "$KIT/harmless-base-test.jsonl.gz"
  du -sh "$KIT"; ls "$KIT/wheels"
  exit 0
fi

OUT=$(realpath -m "${1:-${OUT:-/tmp/gpu_check}}")
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${CPU:-0}" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
else
  PY=${PYTHON:-python3}
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$KIT"/wheels/*.whl
  export PYTHONPATH=/tmp/site
  $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA GPU visible (CPU=1: check the script on CPU)")'
fi
$PY -c 'import torch, transformers; print("torch", torch.__version__, torch.version.cuda, "transformers", transformers.__version__,
  [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
import models; models.check_versions()'

# 1. losses: the HH slice split by prompt into $OUT/data, a Pythia-160M-shaped model (CPU: a small one)
$PY experiments/real_hh.py --split-only --hh "$KIT/harmless-base-test.jsonl.gz" --out "$OUT"
SHAPE='dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)'
[ "${CPU:-0}" = 1 ] && SHAPE='dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)'
MODEL=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_mfu; from pathlib import Path
print(gpu_mfu.build(Path('$OUT/check'), dict(gpu_mfu.PYTHIA_1_4B, **$SHAPE))[0])" | tail -1)
COMMON=(model=blank_model "model.name_or_path=$MODEL" model.block_name=GPTNeoXLayer model.name=check
        "datasets=[hh:$OUT/data]" n_examples=32 batch_size=8 eval_batch_size=8 n_eval_examples=8 max_length=256
        max_prompt_length=128 optimizer=AdamW warmup_steps=0 minimum_log_interval_secs=0 eval_every=1_000_000
        do_first_eval=false sample_during_eval=false wandb.enabled=false "local_dirs=[$OUT/runs]"
        model.reference_dtype=bfloat16 lr=1e-6)
BETA_DPO=(loss=dpo loss.beta=0.1 loss.mode_loss=beta_DPO loss.mode_weight=0.2 loss.a=0.6)
run_dir() { grep -a -m1 '^Writing to ' "$1" | sed 's/^Writing to //'; }
show_stats() { grep -aoE '(train|eval) stats after [0-9]+ examples: .{0,100}' || true; }  # through tqdm's \r
drop_weights() { rm -rf "$1"/step-* "$1"/LATEST "$1"/hf_model; }
FIRST_GPU=${CUDA_VISIBLE_DEVICES:-0}; FIRST_GPU=${FIRST_GPU%%,*}
CUDA_VISIBLE_DEVICES=$FIRST_GPU $PY train.py "${COMMON[@]}" loss=sft model.policy_dtype=bfloat16 exp_name=check_sft \
  2>&1 | tee "$OUT/sft.log" | show_stats
CUDA_VISIBLE_DEVICES=$FIRST_GPU $PY train.py "${COMMON[@]}" "${BETA_DPO[@]}" model.policy_dtype=bfloat16 \
  exp_name=check_beta_dpo_basic 2>&1 | tee "$OUT/basic.log" | show_stats
$PY train.py "${COMMON[@]}" "${BETA_DPO[@]}" trainer=FSDPTrainer model.fsdp_policy_mp=bfloat16 \
  exp_name=check_beta_dpo_fsdp 2>&1 | tee "$OUT/fsdp.log" | show_stats
for log in sft basic fsdp; do drop_weights "$(run_dir "$OUT/$log.log")"; done

$PY - "$OUT" "$(run_dir "$OUT/sft.log")" "$(run_dir "$OUT/basic.log")" "$(run_dir "$OUT/fsdp.log")" <<'EOF'
import json, math, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), dict(zip(('sft', 'beta_dpo_basic', 'beta_dpo_fsdp'), map(Path, sys.argv[2:])))
summary, failed = {}, []
for name, run_dir in runs.items():
    losses = [m['loss/train'] for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())
              if m['split'] == 'train']
    summary[name] = {'run_dir': str(run_dir), 'losses': losses}
    print(f'{name}: train losses {[round(x, 4) for x in losses]}')
    if len(losses) != 4 or not all(math.isfinite(x) for x in losses):
        failed.append(f'{name}: expected 4 finite losses, got {losses}')
    if name != 'sft' and abs(losses[0] - math.log(2)) > 1e-3:
        failed.append(f'{name}: first β-DPO loss {losses[0]} is not ln 2 = 0.693147')
basic, fsdp = summary['beta_dpo_basic']['losses'][:2], summary['beta_dpo_fsdp']['losses'][:2]
if len(basic) == len(fsdp) == 2 and any(abs(a - b) > 0.02 * abs(a) for a, b in zip(basic, fsdp)):
    failed.append(f'BasicTrainer {basic} and FSDPTrainer {fsdp} differ by more than 2% on the first steps')
(out / 'losses.json').write_text(json.dumps(summary, indent=1))
sys.exit('\n'.join(failed) or None)
EOF

# 2. speed and memory of a Pythia-1.4B-shaped β-DPO step
$PY benchmarks/gpu_mfu.py --out "$OUT/mfu" --memory $([ "${CPU:-0}" = 1 ] && echo --cpu)
$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
mfu = json.load(open(f'{out}/mfu/mfu.json'))
summary = {'losses': json.load(open(f'{out}/losses.json')), 'mfu': mfu}
json.dump(summary, open(f'{out}/summary.json', 'w'), indent=1)
memory = mfu['memory']
if memory['measured_gib'] is not None and not 0.75 <= memory['ratio'] <= 1.25:
    sys.exit(f'memory estimate {memory["estimate_gib"]} GiB against {memory["measured_gib"]} GiB measured: off by more than 25%')
EOF
echo "gpu_check.sh: every check passed; figures in $OUT/summary.json"
