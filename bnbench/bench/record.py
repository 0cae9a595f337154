"""What a benchmark run records about itself in results.json, and what ``--resume`` checks against it.

``run.options`` holds the command's options; ``run.state`` is ``running`` while points are measured (a run that is
killed stays so), ``interrupted`` after Ctrl-C, ``complete`` at the end; ``run.points_planned`` counts every point
of the run's grid (those done by earlier, resumed runs too) and ``run.points_done`` those recorded so far.
``bnbench report`` reads these (``bnbench.report.scope.completeness``). Pure: no file I/O.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

__all__ = ["RESUME_OPTIONS", "STATES", "mark", "options_record", "resume_mismatch"]

STATES = ("running", "interrupted", "complete")
#: the options that decide which points a run has and how each is measured: --resume must repeat them
RESUME_OPTIONS = (
    "preset", "from_model", "batch", "width", "spatial", "dtype", "activation", "passes", "layout", "providers",
    "device", "seed", "threads", "cpu_budget_s", "rep_ms", "cuda_graph", "no_interpret",
)  # fmt: skip
#: option names as typed (argparse's dest -> flag)
_FLAGS = {"passes": "--pass"}


def options_record(args) -> dict[str, Any]:
    """The command's options as JSON values (numbers, booleans and None as they are, the rest as text)."""
    return {
        k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
        for k, v in vars(args).items()
        if not k.startswith("_")
    }


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _shown(value) -> str:
    return "(not given)" if value is None else str(value)


def resume_mismatch(previous: dict[str, Any] | None, options: dict[str, Any]) -> str | None:
    """Why an earlier run (its ``run`` object from results.json) cannot be resumed with ``options``, or None
    when it can: every option of :data:`RESUME_OPTIONS` must be the same."""
    recorded = (previous or {}).get("options")
    if not isinstance(recorded, dict):
        return (
            "its results.json does not record the options it ran with, so this run cannot be checked to measure "
            "the same grid the same way"
        )
    differences = [
        f"{_flag(name)} {_shown(recorded.get(name))} then, {_shown(options.get(name))} now"
        for name in RESUME_OPTIONS
        if recorded.get(name) != options.get(name)
    ]
    if not differences:
        return None
    return "it ran with other options: " + "; ".join(differences)


def mark(run: dict[str, Any], state: str, *, points_done: int) -> dict[str, Any]:
    """``run`` with its state and count of recorded points updated (and ``finished_utc`` once complete)."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    updated = {k: v for k, v in run.items() if k != "finished_utc"}
    updated.update(state=state, points_done=points_done, last_update_utc=now)
    if state == "complete":
        updated["finished_utc"] = now
    return updated
