"""The one prepared GPU script (scripts/gpu-check.sh) in its dry-run mode: every bnbench command it would run parses
with the real CLI, so a renamed flag shows here, on CPU, instead of wasting a lent GPU's minutes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bnbench.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> dict[str, list[str]]:
    if not SCRIPT.exists():
        pytest.skip("scripts/gpu-check.sh is not beside the installed tests")
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    out = tmp_path_factory.mktemp("gpu-check")
    subprocess.run(
        ["bash", str(SCRIPT), str(out)], env={"BNBENCH_GPU_DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, check=True
    )
    lines = (out / "commands.txt").read_text().splitlines()
    return {name: shlex.split(command) for name, command in (line.split("\t", 1) for line in lines)}


def test_steps_run_most_valuable_first(commands):
    names = list(commands)
    assert names[0] == "headline" and names.index("step") < names.index("gpu-tests") < names.index("tests")
    assert names.index("step") < names.index("residual") < names.index("gemm")  # issue 15's op, after the step
    assert [n for n in names if n.startswith("kernels-")] == [
        "kernels-32768x1024",
        "kernels-401408x64",
        "kernels-256x1024",
    ]


def test_every_bnbench_command_parses(commands):
    parser = build_parser()
    checked = 0
    for name, argv in commands.items():
        if "bnbench" not in argv:
            continue
        args = argv[argv.index("bnbench") + 1 :]
        try:
            parser.parse_args(args)
        except SystemExit as exit_:  # argparse's way of refusing
            pytest.fail(f"step {name}: `bnbench {' '.join(args)}` does not parse (exit {exit_.code})")
        checked += 1
    assert checked >= 6


def _marker(argv: list[str]) -> str:
    pytest_args = argv[argv.index("pytest") + 1 :]
    return pytest_args[pytest_args.index("-m") + 1]


def test_pytest_steps_select_by_the_gpu_marker(commands):
    assert _marker(commands["gpu-tests"]) == "gpu" and _marker(commands["tests"]) == "not gpu"


def test_the_residual_step_lists_resnet50s_add_shapes_in_bf16_channels_last(commands, capsys):
    """Its dry run on CPU: ResNet-50's 4 residual-add shapes (16 calls) x fwd, fwd_bwd x 3 providers, all bf16
    channels_last act(BN(x) + residual) at batch 128."""
    from bnbench.cli import main

    argv = commands["residual"]
    args = argv[argv.index("bnbench") + 1 :]
    args = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
    assert main([*args, "--dry-run"]) == 0
    points = re.findall(r"\+residual (\w+) (\w+) (\w+) (\S+) (\w+)", capsys.readouterr().out)
    assert len(points) == 4 * 2 * 3
    assert {shape for *_, shape, _ in points} == {"128x256x56x56", "128x512x28x28", "128x1024x14x14", "128x2048x7x7"}
    assert {(dtype, act, layout) for _, dtype, act, _, layout in points} == {("bf16", "relu", "channels_last")}
    assert {pass_ for pass_, *_ in points} == {"fwd", "fwd_bwd"}
