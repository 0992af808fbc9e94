#!/usr/bin/env bash
# The checks that need a CUDA GPU (README, "Speed and memory"), in one go, offline once `make smollm2` has run:
#   1. SmolLM2-135M-Instruct (its GGUF copy, converted once): 4 SFT steps in bfloat16 under BasicTrainer, then 4 β-DPO
#      steps from that archive under BasicTrainer and under FSDPTrainer (nccl, one process per GPU), each in bfloat16
#      (BasicTrainer: bfloat16 weights; FSDP: bfloat16 compute over float32 shards); the reference in bfloat16 too, so
#      the first β-DPO loss is ln 2 (policy = reference). Checks: every loss finite, the first DPO losses ln 2.
#   2. benchmarks/gpu_mfu.py: a Pythia-1.4B-shaped DPO step's time and model FLOPs utilisation, both trainers.
# Usage: bash benchmarks/gpu_check.sh [OUT]   (OUT default /tmp/gpu_check; PYTHON default .venv/bin/python;
#        HH: an hh-rlhf harmless-base .jsonl.gz, default ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)
# Exit status 0 only if every check passed; OUT/summary.json holds the figures. CPU=1 runs the same steps on CPU (FSDP:
# 2 gloo processes) and gpu_mfu.py --cpu: a check of this script, not of a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-/tmp/gpu_check}")
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "${CPU:-0}" != 1 ]; then
  $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA GPU visible (CPU=1: check the script on CPU)")'
fi
$PY -c 'import torch; print(torch.__version__, torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
test -f .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf || { echo 'gpu_check.sh: run `make smollm2` first'; exit 2; }

COMMON=(model=smollm2 "datasets=[hh:$OUT/data]" render_hh_with_chat_template=true n_examples=32 batch_size=8
        eval_batch_size=8 n_eval_examples=8 max_length=256 max_prompt_length=128 optimizer=AdamW warmup_steps=0
        minimum_log_interval_secs=0 eval_every=1_000_000 sample_during_eval=false wandb.enabled=false
        "local_dirs=[$OUT/runs]" model.reference_dtype=bfloat16)
run_dir() { grep -m1 '^Writing to ' "$1" | cut -c12-; }

$PY experiments/real_hh.py --split-only --hh "${HH:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}" --out "$OUT"  # the HH harmless slice, split by prompt, into $OUT/data

$PY train.py "${COMMON[@]}" loss=sft lr=1e-5 model.policy_dtype=bfloat16 exp_name=gpu_sft 2>&1 | tee "$OUT/sft.log"
ARCHIVE=$(run_dir "$OUT/sft.log")/LATEST/policy.pt
BETA_DPO=(loss=dpo loss.beta=0.1 loss.mode_loss=beta_DPO loss.mode_weight=0.2 loss.a=0.6 lr=1e-6 "model.archive=$ARCHIVE")
$PY train.py "${COMMON[@]}" "${BETA_DPO[@]}" model.policy_dtype=bfloat16 exp_name=gpu_beta_dpo_basic 2>&1 | tee "$OUT/basic.log"
$PY train.py "${COMMON[@]}" "${BETA_DPO[@]}" trainer=FSDPTrainer model.fsdp_policy_mp=bfloat16 \
    exp_name=gpu_beta_dpo_fsdp 2>&1 | tee "$OUT/fsdp.log"

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
(out / 'smollm2.json').write_text(json.dumps(summary, indent=1))
sys.exit('\n'.join(failed) or None)
EOF

$PY benchmarks/gpu_mfu.py --out "$OUT/mfu" $([ "${CPU:-0}" = 1 ] && echo --cpu)
$PY -c 'import json, sys; out = sys.argv[1]; json.dump({"smollm2": json.load(open(f"{out}/smollm2.json")),
    "mfu": json.load(open(f"{out}/mfu/mfu.json"))}, open(f"{out}/summary.json", "w"), indent=1)' "$OUT"
echo "gpu_check.sh: every check passed; figures in $OUT/summary.json"
