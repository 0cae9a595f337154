"""``bnbench profile``: one case, a section per provider, traces, the Nsight Compute command."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from bnbench.bench.cases import Case
from bnbench.bench.profiling import TRITON_KERNEL_TENSOR_PASSES, ncu_command, profile_provider
from bnbench.bench.providers import PROVIDERS
from bnbench.cli import main

CASE_FLAGS = ["--batch", "16", "--width", "4", "--pass", "fwd_bwd", "--iters", "2", "--warmup", "1"]


def test_profile_writes_breakdown_trace_and_ncu_command(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", *CASE_FLAGS, "--providers", "eager,triton", "--out", str(out), "--ncu"]) == 0
    text = capsys.readouterr().out
    assert text == (out / "profile.md").read_text() + "\n"  # what is printed is what is written
    assert "## eager" in text and "## triton" in text and "ncu --target-processes all" in text
    assert "--batch 16 --width 4" in text and "--ncu" not in text.split("```")[1]  # the command does not recurse
    kernels = pd.read_csv(out / "kernels.csv")
    assert set(kernels["provider"]) == ({"eager", "triton"} if torch.cuda.is_available() else {"eager"})
    trace = json.loads((out / "trace-eager.json").read_text())
    assert trace["traceEvents"]
    if not torch.cuda.is_available():
        assert "native_batch_norm" in " ".join(kernels["kernel"])  # the aten operators of eager BN on CPU
        assert "skipped: no CUDA device" in text and "need CUDA" in text  # says what it cannot show


def test_profile_takes_one_value_per_axis(capsys):
    assert main(["profile", "--batch", "16,32", "--providers", "eager"]) == 2
    assert "exactly one value" in capsys.readouterr().err
    assert main(["profile", "--spatial", "1", "--layout", "channels_last", "--providers", "eager"]) == 2


def test_ncu_command_selects_the_same_case():
    case = Case("bn2d", "fwd", "gelu", "bf16", "channels_last", 8, 16, 7, 7)
    cmd = ncu_command(case, ["triton"], "/tmp/x.csv")
    assert cmd[0] == "ncu" and "dram__bytes_read.sum" in cmd[cmd.index("--metrics") + 1]
    tail = cmd[cmd.index("profile") + 1 :]
    for flag, value in (("--batch", "8"), ("--width", "16"), ("--spatial", "7x7"), ("--dtype", "bf16"),
                        ("--activation", "gelu"), ("--pass", "fwd"), ("--layout", "channels_last"),
                        ("--providers", "triton")):  # fmt: skip
        assert tail[tail.index(flag) + 1] == value


@pytest.mark.gpu
def test_gpu_profile_of_triton_has_kernels_bytes_and_launch_configs():
    case = Case("bn1d", "fwd_bwd", "relu", "fp32", "nchw", 4096, 256)
    prof = profile_provider(case, PROVIDERS["triton"], torch.device("cuda"), iters=3, warmup=2)
    assert prof.status == "ok", prof.message
    ours = [k for k in prof.kernels if any(name in k.name for name in TRITON_KERNEL_TENSOR_PASSES)]
    assert ours and all(k.gbps and k.gbps > 0 for k in ours)
    assert prof.device_us_per_call > 0 and prof.launches_per_call >= 2  # forward and backward at least
    assert prof.launch_configs and all(cfg["num_warps"] for cfg in prof.launch_configs)
