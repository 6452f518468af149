#!/usr/bin/env bash
# Every GPU figure in one command, most important first, inside a time budget.
#
#   bash benchmarks/gpu_suite.sh OUT                 # on a CUDA machine: 540 s budget (9 minutes)
#   bash benchmarks/gpu_suite.sh --dry-run OUT       # on the CPU: tiny models, every step, every page
#
# Options: --budget SECONDS (or GPU_SUITE_BUDGET; default 540), --tag TAG (default
# <gpu>_suite, e.g. h100_suite; dryrun with --dry-run), --commit SHA (recorded where the
# checkout has no .git), --resume (start from the checkout's train_step_<tag>.json),
# --steps a,b (a subset of: pytest paper gpt2 llama kernels grid).
#
# Steps, in order; each is saved the moment it exists, under OUT/docs/ as in the repository:
#   pytest   pytest -m gpu                                   -> results/gpu_suite_<tag>_pytest.xml
#   paper    ViT-B/16, LoRA q,v, autocast bf16, batch 64     -> results/train_step_<tag>.json
#   gpt2     GPT-2 124M, full fine-tuning, bf16              -> (the same file)
#   llama    LLaMA-1B shape, LoRA q,v, bf16                  -> (the same file)
#            (each of the three: eager, inductor, inductor with pointwise recompute, approxbp)
#   kernels  act pack, code grad (both lowerings), norm backwards against copy bandwidth
#                                                            -> results/kernels_<tag>.json, kernels.md
#   grid     the remaining grid cells, until the deadline    -> results/train_step_<tag>.json
#   render   benchmarks.md, kernels.md, performance.md's "gpu suite" section, images/train_step_<tag>.png
# and results/gpu_suite_<tag>.json: the environment (torch, triton, transformers, GPU, commit)
# and each step's status, time and, if it failed, the end of its log.
#
# Budget: the steps must end RENDER_RESERVE seconds before it, so the pages are always
# rendered. Each step runs under its own `timeout`: the smaller of its cap and the time
# left. A step with under MIN_STEP seconds left is skipped; a step that fails or times out
# is recorded and the next one runs; train_step itself starts no cell it expects to end
# past the deadline. Exit 0 if no step failed or timed out (skipped ones are in the record).
# Copy OUT back over the checkout (cp -r OUT/. .) and commit what it holds.

set -u -o pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

DRY_RUN=0 TAG="" COMMIT="" RESUME="" STEPS="pytest,paper,gpt2,llama,kernels,grid" OUT=""
BUDGET=${GPU_SUITE_BUDGET:-540}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) BUDGET=$2; shift ;;
        --tag) TAG=$2; shift ;;
        --commit) COMMIT=$2; shift ;;
        --resume) RESUME=--resume ;;
        --steps) STEPS=$2; shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || usage

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
# The checkout's approxbp_fx and benchmarks, whatever else is installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
T0=$(date +%s)
RENDER_RESERVE=30   # render: imports and one chart per run, about 15 s on 2 CPU cores
DEADLINE=$((T0 + BUDGET - RENDER_RESERVE))
if [ "$DRY_RUN" = 1 ]; then
    MIN_STEP=5
    DEVICE=(--device cpu)
    # Tiny models, few steps; the grid measures two cells, enough to show it runs.
    SHAPE=(--layers 1 --width-div 4 --vocab 512 --batch 2 --seq 16 --steps 2 --warmup 1)
    GRID_LIMIT=(--max-cells 2)
    KERNEL_FLAGS=(--device cpu --sizes 8192 --iters 1)
else
    MIN_STEP=30
    DEVICE=() SHAPE=() GRID_LIMIT=() KERNEL_FLAGS=()
fi

# torch.compile(backend="approxbp") finds the backend through the package's entry point;
# where approxbp-fx is not installed (the GPU machines), a dist-info on PYTHONPATH declares it.
if ! "$PY" -c "from importlib.metadata import entry_points as e; import sys; sys.exit(not e(group='torch_dynamo_backends', name='approxbp'))"; then
    "$PY" -m benchmarks._gpu_suite entry-points "$SCRATCH/site" && export PYTHONPATH="$SCRATCH/site:$PYTHONPATH"
fi

TAG=$("$PY" -m benchmarks._gpu_suite start "$OUT" --budget "$BUDGET" ${TAG:+--tag "$TAG"} \
      ${COMMIT:+--commit "$COMMIT"} $RESUME $([ "$DRY_RUN" = 1 ] && echo --dry-run) | tail -n 1) || {
    echo "gpu_suite: could not record the environment" >&2; exit 2; }
echo "== gpu suite: tag $TAG, budget ${BUDGET}s, output $OUT"

FAILED=0
# step NAME CAP_SECONDS COMMAND...: run it under the smaller of CAP and the time left, log it, record it.
step() {
    local name=$1 cap=$2; shift 2
    local log="$SCRATCH/$name.log" left=$((DEADLINE - $(date +%s))) status rc t
    if [[ ",$STEPS," != *",$name,"* ]]; then
        return
    fi
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "== $name: skipped, ${left}s left"
        "$PY" -m benchmarks._gpu_suite record "$OUT" "$TAG" "$name" "skipped: no time left" 0 0 0 "$log" "$*"
        return
    fi
    local limit=$((cap < left ? cap : left))
    echo "== $name (limit ${limit}s): $*"
    t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="timed out"; FAILED=1 ;;
        *) status=failed; FAILED=1 ;;
    esac
    echo "== $name: $status (rc $rc, $(($(date +%s) - t))s)"
    "$PY" -m benchmarks._gpu_suite record "$OUT" "$TAG" "$name" "$status" "$rc" "$(($(date +%s) - t))" "$limit" "$log" "$*"
}

TRAIN=("$PY" -m benchmarks.train_step --tag "$TAG" --out-dir "$OUT/docs" --no-render --resume
       --deadline "$DEADLINE" "${DEVICE[@]}" "${SHAPE[@]}")
CORE=(--backends eager inductor inductor_recompute approxbp)
PYTEST=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors
        --junitxml="$OUT/docs/results/gpu_suite_${TAG}_pytest.xml")
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 120)

# Caps from the H100 run of 2026-11-25 (docs/results/train_step_h100.json): 35-50 s of compile
# per compiled backend, 20 steps of 30-80 ms; pytest -m gpu took 33 s with -n 8.
step pytest 150 "${PYTEST[@]}"
step paper 270 "${TRAIN[@]}" --models vit-b16 --scenarios lora_qv --precisions amp "${CORE[@]}"
step gpt2 240 "${TRAIN[@]}" --models gpt2-124m --scenarios full --precisions bf16 "${CORE[@]}"
step llama 270 "${TRAIN[@]}" --models llama-1b --scenarios lora_qv --precisions bf16 "${CORE[@]}"
step kernels 180 "$PY" -m benchmarks.kernels --tag "$TAG" --out-dir "$OUT/docs" "${KERNEL_FLAGS[@]}"
# Every cell not yet measured, all eight backends, in grid order (these models first).
step grid 600 "${TRAIN[@]}" --models vit-b16 gpt2-124m llama-1b roberta-base "${GRID_LIMIT[@]}"

left=$((T0 + BUDGET - $(date +%s)))
echo "== render (limit $((left > 30 ? left : 30))s)"
timeout --kill-after=10 $((left > 30 ? left : 30)) "$PY" -m benchmarks._gpu_suite render "$OUT" "$TAG" || FAILED=1
echo "== gpu suite done in $(($(date +%s) - T0))s; copy back with: cp -r $OUT/. $ROOT/"
exit $FAILED
