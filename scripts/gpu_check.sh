#!/usr/bin/env bash
# The GPU check, to run from the repository root on a machine with an NVIDIA GPU: the kernel tests with the
# Triton kernels compiled (TRITON_INTERPRET=0; bf16 included, in test_triton_compiled_on_gpu_incl_bf16), the
# kernel benchmark at LLaMA-7B layer shapes, SMT trained with kernels=triton vs torch
# (scripts/gpu_train_check.py), smt_bench.bench (every method at LLaMA-7B shape, bf16 autocast), and the device
# profile the forecast refines its vendor figures with (device_profile.json: matmul TFLOP/s, bandwidth, memory).
#   bash scripts/gpu_check.sh        (writes to $OUT, else outputs/gpu; copy what it measured to results/gpu/ to commit it)
#
# It needs Python with torch, triton, pytest, transformers and peft, and does not install the project:
# smt_bench.kernels is put on the path as pyproject maps it (kernels/src/ -> smt_bench.kernels), and
# smt_bench beside it. hydra-core and omegaconf, which smt_bench.bench needs, are installed from the
# wheels in .whl/ (scripts/gpu_wheels.sh makes them; copy .whl/ along with the repository).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-outputs/gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

SMOKE=${GPU_CHECK_SMOKE:-0}   # 1: the same steps at tiny shapes on the CPU (tests/test_gpu_check.py), so it cannot rot
if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PY; run this on a machine with an NVIDIA GPU" >&2
  exit 2
fi
# hydra-core / omegaconf (smt_bench.bench's config), from the wheels scripts/gpu_wheels.sh puts in .whl/,
# installed into a temporary folder
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

shim=$(mktemp -d)
mkdir "$shim/smt_bench"
for f in smt_bench/*; do ln -s "$PWD/$f" "$shim/smt_bench/$(basename "$f")"; done
ln -s "$PWD/kernels/src" "$shim/smt_bench/kernels"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "git sha unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT_DIR/device.txt" 2>&1
cat "$OUT_DIR/device.txt"

# what the forecast needs of this card (smt_bench/forecast/measure.py): bf16 matmul throughput, copy bandwidth,
# memory; `python -m smt_bench.forecast ... forecast.profile=$OUT_DIR/device_profile.json` uses it
"$PY" -m smt_bench.forecast.measure --out "$OUT_DIR" $([ "$SMOKE" = 1 ] && echo --smoke) 2>&1 | tee "$OUT_DIR/device_profile.log"
profile_rc=${PIPESTATUS[0]}

# -o addopts= drops the project's pytest options (pytest-timeout may be absent there); -p no:cacheprovider
# keeps the tree clean
if [ "$SMOKE" = 1 ]; then
  KTESTS=(-k compiled); KBENCH=(--smoke)
  BENCH=(model=tiny-llama device=cpu bench.methods=[floor,smt] bench.budgets=[0.002] bench.steps=2 bench.skip=1
         bench.seq_len=16 bench.isolate=false)
else
  KTESTS=(); KBENCH=()
  # every method at LLaMA-7B shape in bf16 autocast over fp32 masters, at 1 and 2 layers, extrapolated to 32
  BENCH=(model=llama-7b-random device=cuda bench.layers=[1,2] bench.steps=12 bench.skip=2
         bench.methods=[floor,smt,smt_reference,lora,dora,full_ft])
fi
"$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider -o addopts= "${KTESTS[@]}" 2>&1 | tee "$OUT_DIR/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}

"$PY" scripts/bench_kernels.py --out "$OUT_DIR" "${KBENCH[@]}" 2>&1 | tee "$OUT_DIR/bench_kernels.log"
bench_rc=${PIPESTATUS[0]}

# SMT trained 20 steps with kernels=triton and kernels=torch (SmolLM2's architecture): loss curves must agree
"$PY" scripts/gpu_train_check.py --out "$OUT_DIR" $([ "$SMOKE" = 1 ] && echo --smoke) 2>&1 | tee "$OUT_DIR/train_check.log"
train_rc=${PIPESTATUS[0]}

if "$PY" -c "import hydra, omegaconf, transformers, peft" 2>/dev/null; then
  "$PY" -m smt_bench.bench "${BENCH[@]}" bench.out="$OUT_DIR" bench.name=methods 2>&1 | tee "$OUT_DIR/bench_methods.log"
  methods_rc=${PIPESTATUS[0]}
else
  echo "gpu_check: hydra-core / omegaconf / transformers / peft missing: smt_bench.bench skipped (make .whl/ with scripts/gpu_wheels.sh and copy it along)" \
    | tee "$OUT_DIR/bench_methods.log"
  methods_rc=3
fi

rm -rf "$shim"
echo "gpu_check: kernel tests exit $tests_rc, kernel bench exit $bench_rc, train check exit $train_rc," \
  "methods bench exit $methods_rc, device profile exit $profile_rc; files in $OUT_DIR"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && [ "$methods_rc" -eq 0 ] && [ "$profile_rc" -eq 0 ]
