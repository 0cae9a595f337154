"""What this machine can run: versions, the device, the Triton interpreter, the usable backends.

``collect()`` returns a plain dict (the provenance every results file records); ``bnbench env`` prints it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bnbench.interpreter import interpreter_requested, switch_triton_interpreter_on

__all__ = [
    "collect",
    "cpu_cache_bytes",
    "cpu_name",
    "device_slug",
    "format_text",
    "git_sha",
    "interpreter_requested",
    "switch_triton_interpreter_on",
]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha(start: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout bnbench runs from (an editable install), else of the working directory
    (a non-editable install run from the checkout, as nox does), with ``+dirty`` for local changes."""
    if start is None:
        return git_sha(Path(__file__).resolve().parent) or git_sha(Path.cwd())
    here = Path(start)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=5,
        )  # fmt: skip
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    name = line.split(":", 1)[1].strip()
                    if name:
                        return name
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cache_bytes() -> int | None:
    """The CPU's largest cache (its last level) in bytes, from Linux's sysfs; None where it cannot be read.
    Timings of working sets smaller than it are cache timings, not memory-bandwidth ones."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
        except OSError:
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            sizes.append(int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)])
    return max(sizes) if sizes else None


def _device() -> dict[str, Any]:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "type": "cuda",
            "name": props.name,
            "sm_count": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    return {"type": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "cache_bytes": cpu_cache_bytes()}


def _backends(device: dict[str, Any], triton_version: str | None) -> dict[str, str]:
    backends = {"torch": "yes (PyTorch reference)"}
    if triton_version is None:
        backends["triton"] = "no: triton is not installed"
    elif device["type"] == "cuda":
        backends["triton"] = "yes (CUDA)"
    elif interpreter_requested():
        backends["triton"] = "yes (interpreter: correctness only, timings mean nothing)"
    else:
        backends["triton"] = "no: no CUDA device; set TRITON_INTERPRET=1 to run the kernels in the interpreter"
    if device["type"] == "cuda" or shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"):
        backends["compile"] = "yes (torch.compile, inductor)"
    else:
        backends["compile"] = "no: inductor on CPU needs a C++ compiler (g++) on PATH"
    return backends


def collect() -> dict[str, Any]:
    """Versions, device, interpreter state and usable backends, as a JSON-ready dict."""
    import bnbench

    triton_version = _version("triton")
    device = _device()
    return {
        "bnbench_version": bnbench.__version__,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "numpy_version": _version("numpy"),
        "pandas_version": _version("pandas"),
        "matplotlib_version": _version("matplotlib"),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "device": device,
        "triton_interpreter": interpreter_requested(),
        "backends": _backends(device, triton_version),
        "executable": sys.executable,
    }


def device_slug(info: dict[str, Any] | None = None) -> str:
    """A short file-name-safe name for the device: ``h200``, ``h100``, ``a100``, ``cpu``."""
    device = (info or {"device": _device()})["device"]
    if device["type"] != "cuda":
        return "cpu"
    name = device["name"].lower()
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def format_text(info: dict[str, Any]) -> str:
    device = info["device"]
    if device["type"] == "cuda":
        dev = (
            f"{device['name']} (cuda, {device['sm_count']} SMs, {device['memory_gib']} GiB, "
            f"sm_{device['capability'].replace('.', '')}, {device['count']} visible)"
        )
    else:
        cache = device.get("cache_bytes")
        cache_text = f", {cache / 2**20:.0f} MiB last-level cache" if cache else ""
        dev = f"CPU {device['name']} ({device['cores']} cores{cache_text}), no CUDA device"
    lines = [
        f"bnbench     {info['bnbench_version']}" + (f" (git {info['git_sha']})" if info["git_sha"] else ""),
        f"python      {info['python_version']}",
        f"torch       {info['torch_version']}",
        f"triton      {info['triton_version'] or 'not installed'}",
        f"numpy       {info['numpy_version']}",
        f"device      {dev}",
        f"interpreter {'active (TRITON_INTERPRET=1)' if info['triton_interpreter'] else 'off'}",
        "backends",
    ]
    lines += [f"  {name:<9} {status}" for name, status in info["backends"].items()]
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------------------

HELP = "print versions, the device and which backends can run here"
DESCRIPTION = (
    "Print bnbench, torch, triton, numpy and Python versions, the device (GPU name, SM count, memory; or CPU), "
    "whether the Triton interpreter is active, and which backends (torch, triton, compile) can run here."
)


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="emit one JSON object instead of text")


def run(args) -> int:
    import json

    info = collect()
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_text(info))
    return 0
