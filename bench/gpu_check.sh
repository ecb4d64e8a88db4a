#!/usr/bin/env bash
# GPU check of the train stage: bf16 + DeepSpeed ZeRO-2 with one process, and with two when two GPUs
# are visible (nccl). Runs validate -> split -> a short pretrain -> train on the demo data in a
# temporary folder and prints one line per run; about 2-3 minutes on one GPU, under 5 in all.
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# The output (a copy goes to $OUT/gpu_check.log when $OUT is set) belongs in the issue's note.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WORK=$(mktemp -d -t sftflow-gpu-check-XXXX)
LOG=${OUT:-$WORK}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
"$PY" - <<'PY'
import torch, deepspeed, transformers
assert torch.cuda.is_available(), "no CUDA GPU visible: this check is for a GPU machine"
print(f"torch {torch.__version__} cuda {torch.version.cuda} | deepspeed {deepspeed.__version__} | transformers {transformers.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16={torch.cuda.is_bf16_supported()}")
PY
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

COMMON=(-S "paths.artifacts=$WORK/artifacts" -S "paths.metrics=$WORK/metrics" -S "paths.plots=$WORK/plots")
sftflow() { "$PY" -m tasks.cli "$@"; }

start=$SECONDS
sftflow validate "${COMMON[@]}" > "$WORK/validate.log" 2>&1 || { tail -20 "$WORK/validate.log"; exit 1; }
sftflow split "${COMMON[@]}" > "$WORK/split.log" 2>&1 || { tail -20 "$WORK/split.log"; exit 1; }
timeout 120 "$PY" -m tasks.cli pretrain "${COMMON[@]}" -S pretrain.max_steps=150 -S pretrain.batch_size=32 \
  > "$WORK/pretrain.log" 2>&1 || { tail -30 "$WORK/pretrain.log"; exit 1; }
"$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"pretrain: {m['params']/1e6:.2f}M params, {m['steps']} steps, val loss {m['val_loss']}, {m['tokens_per_second']:.0f} tokens/s, {m['seconds']} s\")" "$WORK/metrics/pretrain.json"

RANKS=(1)
[ "$GPUS" -ge 2 ] && RANKS+=(2)
for n in "${RANKS[@]}"; do
  rm -rf "$WORK/artifacts/train" "$WORK/metrics/train.json"
  if ! timeout 150 "$PY" -m tasks.cli train "${COMMON[@]}" \
      -S train.deepspeed_config=configs/deepspeed/zero2.json -S train.precision=bf16 \
      -S "train.num_processes=$n" -S train.max_steps=150 -S train.batch_size=32 \
      -S train.save_steps=75 -S train.eval_steps=50 -S train.logging_steps=10 > "$WORK/train-$n.log" 2>&1; then
    echo "train with $n process(es) FAILED:"; tail -40 "$WORK/train-$n.log"; exit 1
  fi
  "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"train: {m['num_processes']} process(es), bf16={m['bf16']}, ZeRO-2 ({m['deepspeed_config']}): {m['steps']} steps, train loss {m['train_loss']}, val loss {m['val_loss']} (base {m['base_val_loss']}), {m['tokens_per_second']:.0f} tokens/s, {m['samples_per_second']} samples/s, GPU peak {m.get('gpu_peak_memory_mb')} MiB, {m['seconds']} s\")" "$WORK/metrics/train.json"
done
echo "gpu check passed in $((SECONDS - start)) s (work folder $WORK)"
