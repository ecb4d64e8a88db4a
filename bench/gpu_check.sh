#!/usr/bin/env bash
# GPU check (issue 19): a 0.5B-class Qwen2 built from a config, LoRA in bf16 under DeepSpeed ZeRO-2 and
# ZeRO-3, evaluate, and the bf16 / bitsandbytes quantize, in ~10 minutes on one GPU. The steps, the
# packages it needs and its output are described in bench/gpu_check.py, which this wrapper runs.
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#   bash bench/gpu_check.sh --tiny     # the same steps on a tiny model on the CPU (checks the script)
#
# The output (gpu_check.log and gpu_check.json go to $OUT when it is set) belongs in the issue's note.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"
