#!/usr/bin/env bash
# The device check: one command, run from the repository root on a lent GPU (see DEVELOPERS.md).
#
#   bash scripts/gpu_check.sh              # install the carried wheels (.whl/), the CUDA tests
#                                          # (pytest -m gpu), then benchmarks/bench_gpu.py; ~6-8 min on an H200
#   bash scripts/gpu_check.sh --dry-run    # the same steps on a machine without CUDA, in ~30 s (CI runs it):
#                                          # no install, a few of the gpu tests, the benchmark's dry mode
#   bash scripts/gpu_check.sh --only bench # one stage (tests or bench), e.g. to rerun what failed
#   bash scripts/gpu_check.sh --quick      # a shorter benchmark (hidden 4096, batch 1, fewer repeats)
#
# Everything goes under $OUT (default out/gpu_check): env.txt, tests.log, tests.xml, bench.log,
# bench.json and summary.txt (six files, one folder: what the device tool brings back). The summary
# prints last. Each stage has a time limit, so the whole check ends inside 8 minutes; a stage that fails
# or runs out of time is reported and the next one still runs. Exit status: 0 only if every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
QUICK=0
STAGES="tests bench"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --quick) QUICK=1 ;;
        --only) shift; STAGES="${1:?--only needs tests or bench}" ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Seconds per stage: tests then bench, inside 8 minutes with the install and the summary.
TESTS_LIMIT_S=${TESTS_LIMIT_S:-210}
BENCH_LIMIT_S=${BENCH_LIMIT_S:-240}
SITE=/tmp/gpu_check_site
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

# -- 1. the carried wheels (transformers >= 5.23, bitsandbytes 0.50.2): see scripts/fetch_gpu_wheels.sh
PYPATH="$PWD/src"
if [ "$DRY_RUN" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    log "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
        PYPATH="$SITE:$PYPATH"
    else
        log "WARNING: installing the wheels failed; going on with the image's packages"
    fi
elif [ "$DRY_RUN" = 0 ]; then
    log "WARNING: no .whl/ folder: transformers and bitsandbytes are the image's (run scripts/fetch_gpu_wheels.sh and carry .whl)"
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. the machine
{
    echo "gpu_check $([ "$DRY_RUN" = 1 ] && echo --dry-run) $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
names = ["torch", "triton", "transformers", "accelerate", "bitsandbytes", "huggingface_hub", "tokenizers", "safetensors", "pytest"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("python", platform.python_version(), "|", " | ".join(f"{n} {version(n)}" for n in names))
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import llm_int8
from llm_int8 import dispatch
print("llm_int8", llm_int8.__file__, "| cuda backend:", dispatch.kernel_backend("cuda"), "|", dispatch.gpu_path_unavailable_reason() or "Triton path available")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- 3. the CUDA tests
TESTS_STATUS="not run"
if [[ " $STAGES " == *" tests "* ]]; then
    log "pytest -m gpu (limit ${TESTS_LIMIT_S}s)"
    # A Triton kernel that falls back to torch ops fails the test it happens in (the tests that make one
    # fail on purpose catch their warning).
    PYTEST_ARGS=(-m gpu tests/test_gpu.py tests/test_triton_kernels.py -q -p no:cacheprovider -o addopts=-ra
                 -W error::llm_int8.dispatch.TritonFallbackWarning --junitxml "$OUT/tests.xml")
    if [ "$DRY_RUN" = 1 ]; then
        # Without CUDA the test_gpu.py tests skip; of the Triton tests (CI runs them all), a few that cross
        # every stage: the forward against the reference, the fallback, no host reads.
        PYTEST_ARGS+=(-k "test_gpu or (mixed_linear_matches_reference and float16) or falls_back_once or read_nothing")
    elif "$PY" -c "import xdist" 2>/dev/null; then
        PYTEST_ARGS+=(-n 4)  # Triton's compiles dominate: four at a time (the machine has 16 cores)
    fi
    timeout -s INT -k 20 "$TESTS_LIMIT_S" "$PY" -m pytest "${PYTEST_ARGS[@]}" >"$OUT/tests.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/tests.log"
    counts=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/tests.log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')
    case $rc in
        0) TESTS_STATUS="ok ($counts)" ;;
        124|130|137) TESTS_STATUS="TIMED OUT after ${TESTS_LIMIT_S}s (${counts:-no summary})" ;;
        *) TESTS_STATUS="FAILED rc=$rc (${counts:-no summary})" ;;
    esac
    log "tests: $TESTS_STATUS"
fi

# -- 4. the benchmark
BENCH_STATUS="not run"
if [[ " $STAGES " == *" bench "* ]]; then
    BENCH_ARGS=(--json "$OUT/bench.json")
    [ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--dry-run)
    [ "$QUICK" = 1 ] && BENCH_ARGS+=(--hidden 4096 --batches 1 --repeats 5 --generate-repeats 2)
    log "benchmarks/bench_gpu.py ${BENCH_ARGS[*]} (limit ${BENCH_LIMIT_S}s)"
    timeout -s INT -k 20 "$BENCH_LIMIT_S" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" >"$OUT/bench.log" 2>&1
    rc=$?
    case $rc in
        0) BENCH_STATUS="ok" ;;
        124|130|137) BENCH_STATUS="TIMED OUT after ${BENCH_LIMIT_S}s" ;;
        *) BENCH_STATUS="FAILED rc=$rc" ;;
    esac
    log "bench: $BENCH_STATUS"
fi

# -- 5. the summary, printed last
{
    head -n 1 "$OUT/env.txt"
    grep -E "^(python|cuda|llm_int8) " "$OUT/env.txt"
    echo "tests: $TESTS_STATUS"
    [ -f "$OUT/tests.log" ] && grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -n 40
    echo "bench: $BENCH_STATUS"
    if [ -f "$OUT/bench.log" ]; then
        # the tables and the goals (from the first table on), or the end of a failed run
        if grep -q "^layer time\|^generate:" "$OUT/bench.log"; then
            sed -n '/^\(layer time\|generate:\)/,$p' "$OUT/bench.log" | grep -v "^  timed "
        else
            tail -n 30 "$OUT/bench.log"
        fi
    fi
    echo "gpu_check took $(( $(date +%s) - START ))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} >"$OUT/summary.txt"
echo "================================ summary ================================"
cat "$OUT/summary.txt"
[[ "$TESTS_STATUS" == ok* || "$TESTS_STATUS" == "not run" ]] && [[ "$BENCH_STATUS" == ok || "$BENCH_STATUS" == "not run" ]]
