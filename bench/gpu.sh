#!/usr/bin/env bash
# Every GPU check in one run that fits a 10-minute device lease (expected: 5-7 minutes on an H100/H200; the
# timeouts below cap it at 9): the GPU suite (tests/gpu, marker cuda: the demo end to end on CUDA and again
# to resume; evaluate/predict/attention/calibrate --device cuda against the CPU; OnnxPredictor on the CUDA
# provider; host syncs per training step; peak memory at batch 2, 800x1333; DDP over NCCL; CUDA vs CPU
# steps), then the Cityscapes recipe's training step (bench/gpu_recipe.py: step time, images/s, peak memory;
# matched-only masks vs all queries; fp32, bf16, fp16). docs/gpu.md explains each figure.
#
#   bash bench/gpu.sh                     # from the repository root or anywhere
#   OUT=/some/folder bash bench/gpu.sh    # where the JSON goes (default: bench/results)
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Writes into $OUT: gpu_summary.json (machine, exit statuses, durations, and every figure below),
# gpu_figures.json (syncs per step, peak memory: written by the suite), gpu_recipe.json, gpu_suite.xml
# (JUnit) and gpu_suite.log. Needs torch with CUDA, torchvision, scipy (and onnxruntime-gpu for the ONNX
# check, which is skipped, with its reason in the log, without it); runs from the source tree
# (PYTHONPATH=src), so the package need not be installed. Exit status: 0 when all passed, 1 when a test
# failed or the recipe gave a non-finite loss, 2 without a GPU, 3 when torch does not import.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_FIGURES="$DEST/gpu_figures.json"
rm -f "$GPU_FIGURES"
begin=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" - "$DEST/gpu_machine.json" <<'EOF' || exit 3
import json, platform, sys, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "devices": torch.cuda.device_count(), "python": platform.python_version()}
try:
    import onnxruntime
    info["onnxruntime_providers"] = onnxruntime.get_available_providers()
except ImportError:
    info["onnxruntime_providers"] = None
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"), indent=2)
EOF
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to run (the suite would only skip)" >&2
  exit 2
fi

echo "== GPU suite (tests/gpu)"
start=$(date +%s)
timeout 400 "$PY" -m pytest tests/gpu -m cuda -q -ra -s -p no:cacheprovider --durations 10 \
  --junitxml "$DEST/gpu_suite.xml" 2>&1 | tee "$DEST/gpu_suite.log"
suite=${PIPESTATUS[0]}
suite_s=$(( $(date +%s) - start ))
echo "== GPU suite: exit $suite in $suite_s s"

echo "== recipe step (bench/gpu_recipe.py)"
start=$(date +%s)
timeout 120 "$PY" bench/gpu_recipe.py --reps 5 --json "$DEST/gpu_recipe.json"
recipe=$?
recipe_s=$(( $(date +%s) - start ))
echo "== recipe step: exit $recipe in $recipe_s s"

"$PY" - "$DEST" "$suite" "$suite_s" "$recipe" "$recipe_s" "$(( $(date +%s) - begin ))" <<'EOF'
import json, sys
from pathlib import Path
dest, suite, suite_s, recipe, recipe_s, total_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
def read(name):
    path = dest / name
    return json.loads(path.read_text()) if path.is_file() else None
summary = {"machine": read("gpu_machine.json"), "suite_exit": suite, "suite_seconds": suite_s,
           "recipe_exit": recipe, "recipe_seconds": recipe_s, "total_seconds": total_s,
           "figures": read("gpu_figures.json"), "recipe": read("gpu_recipe.json")}
(dest / "gpu_summary.json").write_text(json.dumps(summary, indent=2))
print(f"summary: {dest / 'gpu_summary.json'}")
EOF

if [ "$suite" -ne 0 ] || [ "$recipe" -ne 0 ]; then
  echo "FAILED: suite exit $suite, recipe exit $recipe" >&2
  exit 1
fi
echo "OK: $DEST/gpu_summary.json"
