#!/usr/bin/env bash
# The GPU check: the one prepared command for a lent CUDA machine (no network, no nox needed).
#
#   bash scripts/gpu-check.sh OUT_DIR
#
# Runs, most valuable first, each step bounded by what is left of a time budget (BNBENCH_GPU_BUDGET_S, default
# 450 s, so that the whole call ends inside 8 minutes with the install):
#   headline   bnbench bench --preset baseline: docs/measuring.md's baseline shapes, eager / compile / triton
#   kernels    bnbench profile of the training forward at 32768x1024, 401408x64 and 256x1024 fp32: each kernel's
#              time on its own (statistics, combine, apply), launches per call, GPU vs wall time
#   step       bnbench step: ResNet-50, batch 128, bf16 autocast, channels_last, eager / compile / fused /
#              fused-compile
#   residual   bnbench bench --op bn_add_act on ResNet-50's 4 residual-add shapes (its 16 block-final BatchNorms)
#              at batch 128, bf16 channels_last, fwd and fwd_bwd: act(BN(x) + residual) fused vs eager / compile
#   gemm       bnbench bench --op linear_bn_act / conv1x1_bn_act: the matmul + BatchNorm layers vs their chains
#   gpu-tests  pytest -m gpu (the tests that need CUDA: determinism hammer, CUDA graphs, >2**31 elements, ...)
#   tests      the rest of the suite, natively on the GPU
#   report     bnbench report over the headline
# A step that fails or runs out of time is recorded (steps.tsv) and the next one runs; an interrupted bench keeps
# its finished points (it is stopped with SIGINT). Everything a step writes is packed into OUT_DIR/gpu-check.tar.gz;
# OUT_DIR also gets steps.tsv and summary.txt (the compact table printed last), so that three files come back.
# Exit status: 0 every step ok, 1 some step failed or was cut short, 3 the install failed.
# BNBENCH_GPU_DRY_RUN=1 installs and runs nothing: it writes each step's command line to OUT_DIR/commands.txt
# (tests/test_gpu_check.py parses every bnbench command there with the real CLI, so a typo cannot waste GPU time).
set -uo pipefail
out=${1:?usage: bash scripts/gpu-check.sh OUT_DIR}
budget=${BNBENCH_GPU_BUDGET_S:-450}
py=${PYTHON:-python3}
start=$(date +%s)
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/bnbench-gpu-check.XXXXXX")
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset TRITON_INTERPRET

steps="$out/steps.tsv"
printf 'step\tstatus\tseconds\tlimit_s\n' > "$steps"
status=0

left() { echo $((budget - ($(date +%s) - start))); }

# step NAME CAP_S CMD...: run CMD (output in $work/NAME.log) for at most min(CAP_S, budget left) seconds
step() {
    local name=$1 cap=$2
    shift 2
    local remaining limit t0 rc outcome
    remaining=$(left)
    limit=$((cap < remaining ? cap : remaining))
    if [ "$limit" -lt 20 ]; then
        printf '%s\tskipped: budget spent\t0\t%s\n' "$name" "$limit" >> "$steps"
        status=1
        return
    fi
    if [ -n "${BNBENCH_GPU_DRY_RUN:-}" ]; then
        { printf '%s\t' "$name"; printf '%q ' "$@"; echo; } >> "$out/commands.txt"
        return
    fi
    t0=$(date +%s)
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    case $rc in
        0) outcome=ok ;;
        124 | 130 | 137) outcome="cut at the limit (rc $rc)"; status=1 ;;
        *) outcome="failed (rc $rc)"; status=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$outcome" "$(($(date +%s) - t0))" "$limit" >> "$steps"
}

if [ -n "${BNBENCH_GPU_DRY_RUN:-}" ]; then
    : > "$out/commands.txt"
else
    "$py" -m pip install -q --no-build-isolation --no-deps -e . > "$work/install.log" 2>&1 || {
        cat "$work/install.log"
        exit 3
    }
    "$py" -m bnbench env > "$work/env.txt" 2>&1
    nvidia-smi > "$work/nvidia-smi.txt" 2>&1 || true
fi

step headline 170 "$py" -m bnbench bench --preset baseline --providers eager,compile,triton --no-progress \
    --out "$work/bench"
for shape in 32768x1024 401408x64 256x1024; do
    step "kernels-$shape" 40 "$py" -m bnbench profile --batch "${shape%x*}" --width "${shape#*x}" --pass fwd \
        --providers eager,compile,triton --no-trace --out "$work/profile-$shape"
done
step step 150 "$py" -m bnbench step --model resnet50 --batch 128 --dtype bf16 --layout channels_last \
    --providers eager,compile,fused,fused-compile --steps 10 --warmup 3 --profile-steps 1 --no-progress \
    --out "$work/step-resnet50"
step residual 90 "$py" -m bnbench bench --op bn_add_act --from-model resnet50 --batch 128 --dtype bf16 \
    --layout channels_last --pass fwd,fwd_bwd --providers eager,compile,triton --no-progress \
    --out "$work/bench-residual"
step gemm 60 "$py" -m bnbench bench --op linear_bn_act,conv1x1_bn_act --providers eager,compile,triton \
    --no-progress --out "$work/bench-gemm"
step gpu-tests 90 "$py" -P -m pytest -q -ra -m gpu --junitxml="$work/pytest-gpu.xml"
step tests 150 "$py" -P -m pytest -q -ra -m "not gpu" --maxfail=20 --junitxml="$work/pytest.xml"
if [ -f "$work/bench/results.csv" ] || [ -n "${BNBENCH_GPU_DRY_RUN:-}" ]; then
    step report 30 "$py" -m bnbench report "$work/bench" --out "$work/report"
fi

if [ -n "${BNBENCH_GPU_DRY_RUN:-}" ]; then
    rm -rf "$work"
    exit 0
fi
{
    echo "bnbench GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - start)) s of a $budget s budget"
    head -n 3 "$work/env.txt" 2>/dev/null
    echo
    column -t -s $'\t' "$steps" 2>/dev/null || cat "$steps"
    for f in "$work/bench/summary.md" "$work/step-resnet50/summary.md" "$work/bench-residual/summary.md" \
        "$work/bench-gemm/summary.md"; do
        [ -f "$f" ] && { echo; echo "== ${f#"$work"/}"; head -n 40 "$f"; }
    done
    for f in "$work"/pytest-gpu.xml "$work"/pytest.xml; do
        [ -f "$f" ] && echo "${f##*/}: $(grep -o 'tests="[0-9]*" \|failures="[0-9]*"\|errors="[0-9]*"\|skipped="[0-9]*"' "$f" | head -n 4 | tr '\n' ' ')"
    done
} > "$out/summary.txt"
cp "$steps" "$work/steps.tsv"
tar -czf "$out/gpu-check.tar.gz" -C "$work" .
rm -rf "$work"
cat "$out/summary.txt"
exit $status
