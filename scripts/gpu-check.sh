#!/usr/bin/env bash
# The GPU check: one command for a lent CUDA machine with no network and no nox.
#   bash scripts/gpu-check.sh OUT_DIR [BENCH_ARGS...]
# Installs bnbench in place (--no-build-isolation --no-deps), runs the whole test suite natively on the GPU,
# then the standard benchmark and its report (HTML page), writing everything under OUT_DIR. Exits non-zero if either step failed.
set -uo pipefail
out=${1:?usage: bash scripts/gpu-check.sh OUT_DIR [BENCH_ARGS...]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset TRITON_INTERPRET

"$py" -m pip install -q --no-build-isolation --no-deps -e . || exit 3
"$py" -m bnbench env | tee "$out/env.txt"

status=0
# -P: do not put the working directory on sys.path (tests import the installed package)
"$py" -P -m pytest -q -ra --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log" || status=1
bench_args=("$@")
[ ${#bench_args[@]} -gt 0 ] || bench_args=(--preset standard)
"$py" -m bnbench bench "${bench_args[@]}" --out "$out/bench" 2>&1 | tee "$out/bench.log" || status=1
"$py" -m bnbench report "$out/bench" --out "$out/report" 2>&1 | tee "$out/report.log" || status=1
exit $status
