"""The package itself: cheap import, the env command, the wheel layout, the CLI entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bnbench
import bnbench.kernels
from bnbench import cli, envinfo

REPO = Path(__file__).resolve().parents[1]


def test_import_does_no_device_probing_or_compilation(run_python):
    # A fresh interpreter: importing bnbench must not import triton, initialise CUDA or load the kernels.
    code = (
        "import sys, torch, bnbench\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'bnbench.kernels' not in sys.modules, 'kernels imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "print('ok')\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tests_run_against_the_installed_package():
    if os.environ.get("BNBENCH_TEST_INSTALLED") != "1":
        pytest.skip("only checked under `nox -s tests`, which installs the wheel")
    assert "site-packages" in bnbench.__file__, bnbench.__file__


def test_env_text_names_versions_device_and_backends(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("bnbench", "torch", "triton", "numpy", "python", "device", "interpreter", "backends"):
        assert key in out
    assert bnbench.__version__ in out


def test_env_json_is_one_object_with_the_documented_keys(capsys):
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("bnbench_version", "torch_version", "triton_version", "numpy_version", "python_version"):
        assert info[key], key
    assert info["device"]["type"] in ("cpu", "cuda")
    assert set(info["backends"]) == {"torch", "triton", "compile"}
    assert isinstance(info["triton_interpreter"], bool)


def test_device_slug_names_cards_and_cpu():
    def info(name):
        return {"device": {"type": "cuda", "name": name}}

    assert envinfo.device_slug(info("NVIDIA H200")) == "h200"
    assert envinfo.device_slug(info("NVIDIA H100 80GB HBM3")) == "h100"
    assert envinfo.device_slug({"device": {"type": "cpu", "name": "x86_64"}}) == "cpu"


def test_console_script_and_module_entry_point_agree(run_python):
    result = run_python("-m", "bnbench", "--help")
    assert result.returncode == 0, result.stderr
    for command in cli.COMMANDS:
        assert command in result.stdout
    assert run_python("-m", "bnbench", "no-such-command").returncode == 2


@pytest.mark.slow
def test_built_wheel_ships_kernels_inside_bnbench(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and "No module named" in result.stderr and "setuptools" in result.stderr:
        pytest.skip("setuptools is not installed in this environment (needed to build offline)")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("bnbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bnbench/kernels/__init__.py" in names
    assert "bnbench/kernels/launchers.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels must not be a top-level package"


def _imports(path: Path) -> list[str]:
    """Every absolute name a source file imports, lazily or not (``from a import b`` gives ``a`` and ``a.b``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _imported_folders(path: Path) -> set[str]:
    """The bnbench folders (bench, distributed, report, train) a source file imports from."""
    folders = set()
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "bnbench" and len(parts) > 1 and parts[1] in ("bench", "distributed", "report", "train"):
            folders.add(parts[1])
    return folders


def test_dependencies_run_one_way():
    """The core layer imports none of the folders built on it, distributed/ none but the core, and the kernels
    nothing of bnbench: what made the import loops through the old distributed_cli.py cannot come back."""
    package = Path(bnbench.__file__).parent
    facade_and_cli = {"__init__.py", "cli.py"}  # the package's exports and the subcommand dispatcher
    for path in sorted(package.glob("*.py")):
        if path.name not in facade_and_cli:
            assert not _imported_folders(path), f"{path.name} imports {_imported_folders(path)}"
    for path in sorted((package / "distributed").glob("*.py")):
        assert _imported_folders(path) <= {"distributed"}, f"distributed/{path.name}"
    for folder in ("bench", "train"):
        for path in sorted((package / folder).glob("*.py")):
            assert not _imported_folders(path) & ({"bench", "train"} - {folder}), f"{folder}/{path.name}"
    for path in sorted(Path(bnbench.kernels.__file__).parent.glob("*.py")):
        assert not [n for n in _imports(path) if n.split(".")[0] == "bnbench"], f"kernels/{path.name}"
