#!/usr/bin/env bash
# The GPU checks in one short run (< 5 minutes on an H200): the GPU suite (tests/gpu, marker cuda), then the
# Cityscapes recipe's training step (bench/gpu_recipe.py: step time, images/s, peak memory; matched-only
# masks vs all queries; fp32, bf16, fp16). Figures and the suite's report go to $OUT when it is set, else
# to bench/results/.
#
#   bash bench/gpu.sh            # from the repository root or anywhere
#   PYTHON=/path/to/python bash bench/gpu.sh
#
# Needs torch with CUDA, torchvision and scipy; runs from the source tree (PYTHONPATH=src), so the package
# need not be installed. Exit status: non-zero when a test fails, the recipe gives a non-finite loss, or
# there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="${OUT:-bench/results}"
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PY" -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))" || exit 3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to run (the suite would only skip)" >&2
  exit 2
fi

echo "== GPU suite (tests/gpu)"
start=$(date +%s)
timeout 240 "$PY" -m pytest tests/gpu -m cuda -q -ra -s -p no:cacheprovider --junitxml "$DEST/gpu_suite.xml" 2>&1 | tee "$DEST/gpu_suite.log"
suite=${PIPESTATUS[0]}
echo "== GPU suite: exit $suite in $(( $(date +%s) - start )) s"

echo "== recipe step (bench/gpu_recipe.py)"
start=$(date +%s)
timeout 180 "$PY" bench/gpu_recipe.py --reps 5 --json "$DEST/gpu_recipe.json"
recipe=$?
echo "== recipe step: exit $recipe in $(( $(date +%s) - start )) s"

if [ "$suite" -ne 0 ] || [ "$recipe" -ne 0 ]; then
  echo "FAILED: suite exit $suite, recipe exit $recipe" >&2
  exit 1
fi
echo "OK: figures in $DEST/gpu_recipe.json, suite report in $DEST/gpu_suite.xml"
