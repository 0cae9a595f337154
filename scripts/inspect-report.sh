#!/usr/bin/env bash
# Regenerate the inspect report: plan and sm_90 compiled facts of MEASURE.md's baseline shapes and ResNet-50's BN
# shapes at batch 256 (fp32 and bf16, both layouts), and host us per call beside eager on a tiny input.
# Nothing runs on a GPU. Usage: bash scripts/inspect-report.sh [OUT_DIR] (default reports/inspect/cpu-<UTC date>).
# Use the Triton of the GPU image (3.6) for figures comparable with GPU runs.
set -euo pipefail
out="${1:-reports/inspect/cpu-$(date -u +%Y%m%d)}"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
python -m bnbench inspect --preset report --out "$out" \
    --regenerate "bash scripts/inspect-report.sh $out" > /dev/null
python -m bnbench inspect --batch 32 --width 64 --dtype fp32,bf16 --pass fwd,fwd_bwd --host-overhead --calls 500 \
    --out "$out/host" --regenerate "bash scripts/inspect-report.sh $out" > /dev/null
echo "inspect report written to $out"
