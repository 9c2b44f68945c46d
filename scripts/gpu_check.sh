#!/usr/bin/env bash
# The checks only a CUDA GPU can make, in one run of under 9 minutes on one GPU (an H200 here):
# the phases' limits add up to 510 s, installing takes seconds.
#
#   scripts/gpu_check.sh fetch   # here, with the package index: the wheels the GPU image lacks, into .whl/
#   scripts/gpu_check.sh         # there (carry .whl): install them, then test and benchmark
#
# The GPU image has Python 3.12 with torch (2.11+cu130), numpy, scikit-learn, safetensors, tqdm,
# tensorboard, matplotlib, pytest, pytest-xdist and hypothesis, but not omegaconf (and its antlr4
# runtime), gymnasium (and farama-notifications) or torchdata: those travel as wheels in .whl/
# (git-ignored through .git/info/exclude). The package is installed with --no-deps, so its
# `torch>=2.13` pin does not refuse the image's torch.
#
# Writes under $OUT (default ./gpu_out): env.txt (versions, GPU), cuda.log (the cuda-marked tests),
# fused_diag.txt (fused against multi-tensor Adam on the GPU, under each numerics setting),
# suite.log (the GPU-relevant part of the suite), gpu_lm.log and gpu_lm.json (bench/gpu_lm.py).
# Each phase has its own time limit; the script goes on after a failing phase and exits non-zero
# if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

if [[ "${1:-}" == "fetch" ]]; then
    set -e
    grep -qxF "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >>.git/info/exclude
    mkdir -p "$WHEELS"
    platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" omegaconf==2.3.0 gymnasium==1.2.2 farama-notifications==0.0.4 torchdata==0.11.0
    # antlr4's runtime (omegaconf's parser) is published as source only: built here, pure Python.
    "$PY" -m pip wheel --quiet --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3
    ls -l "$WHEELS"
    exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

phase() {  # phase NAME LIMIT_S LOG COMMAND...: runs one phase under its limit, its output in LOG
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$OUT/$log"
    tail -n 5 "$OUT/$log"
    ((rc == 0)) || failed+=("$name ($rc)")
}

if ! "$PY" -c "import omegaconf, gymnasium, torchdata" 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'scripts/gpu_check.sh fetch' here and carry $WHEELS"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
    echo "(could not install the ml script: the tests run it as python -m ml.cli)"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('tf32 matmul', torch.backends.cuda.matmul.allow_tf32, 'cudnn', torch.backends.cudnn.allow_tf32)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. The cuda-marked tests (tests/test_cuda.py), each on its own: about a minute.
phase cuda 110 cuda.log "$PY" -m pytest -q -m cuda -rA --durations=0 tests/test_cuda.py

# 2. Fused against multi-tensor Adam on the GPU (tests/optimizers/test_fast.py's comparison):
#    the same fused run twice (are the kernels deterministic?), fused against foreach, with the
#    trainer's deterministic kernels on or off and TF32 off or on: which setting makes them part.
phase fused_diag 50 fused_diag.txt "$PY" - <<'EOF'
import tempfile
from pathlib import Path

import torch

from tests.test_cuda import _tiny_run

print(f"{'deterministic':>13} {'tf32':>5} {'fused twice':>12} {'fused-foreach (max; net.0.bias apart)':>40}")
for deterministic in (True, False):
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        with tempfile.TemporaryDirectory() as tmp:
            runs = [_tiny_run(Path(tmp) / name, fast, deterministic) for name, fast in
                    (("a", True), ("b", True), ("c", False))]
        twice = max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0])
        apart = {k: (runs[0][k] - runs[2][k]).abs().max().item() for k in runs[0]}
        rest = max(v for k, v in apart.items() if k != "net.0.bias")
        print(f"{deterministic!s:>13} {tf32!s:>5} {twice:12.3e} {rest:18.3e} {apart}")
EOF

# 3. The GPU-relevant part of the suite, on the GPU wherever a test does not pin the CPU.
phase suite 150 suite.log "$PY" -m pytest -q -n 12 --dist loadfile --durations=15 -p no:cacheprovider \
    tests/trainers tests/optimizers tests/tasks tests/utils tests/examples tests/launchers \
    tests/e2e/test_resume.py tests/test_readme.py tests/bench/test_gpu_lm_smoke.py

# 4. The benchmark: plain loop and ml, eager and compiled, GPT-2 small shape.
phase gpu_lm 200 gpu_lm.log "$PY" bench/gpu_lm.py --json "$OUT/gpu_lm.json" --timeout 150

if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all phases passed"
