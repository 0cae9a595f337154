"""Baseline run vs candidate run, point by point: time ratios, noise bands, labels and regressions.

Points are matched on the case, the provider and the timer (``bnbench.report.points.POINT_KEY``). For a matched
point timed in both runs, with each run's run-to-run noise band [p20, p80]:

- ``slower`` / ``faster``: the bands do not overlap (the change is outside the noise);
- ``same``: each median lies inside the other run's band (the change is indistinguishable from noise);
- ``ambiguous``: the bands overlap but a median lies outside the other band, or a band is missing.

A *regression* is a ``slower`` point whose median ratio exceeds ``(1 + threshold) * slowdown``, or a point that
was ok in the baseline and is incorrect, error or oom in the candidate (a wrong or crashing kernel is worse than
a slow one). ``slowdown`` is 1 unless the machine changed between the runs (``bnbench.report.machine``): then it
is the most the machine change alone explains, and a point is not called a regression on that alone.
Points in only one run are labelled ``missing``; points not ok in either run ``not-ok``; points timed by the
Triton interpreter ``untimed`` (their times mean nothing). Nothing is dropped silently.

The *gate* (:func:`gate_failures`, the exit code of ``bnbench report --baseline A --candidate B``) fails on a
regression, on a baseline point missing from the candidate, and when the runs share no point at all: a candidate
that measured nothing, or something else, has not passed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bnbench.report.document import Section, Table, Text
from bnbench.report.machine import MachineCheck
from bnbench.report.points import POINT_KEY, case_label, geomean, sort_points

__all__ = [
    "LABELS",
    "compare_runs",
    "compare_sections",
    "compare_summary",
    "gate_failures",
    "has_regression",
    "provenance_table",
    "regressions",
]

LABELS = ("faster", "slower", "same", "ambiguous", "missing", "not-ok", "untimed")
#: labels whose ratio is a meaningful timing comparison
TIMED_LABELS = ("faster", "slower", "same", "ambiguous")
_BROKEN = ("incorrect", "error", "oom")
_STATS = ("ms_p20", "ms_p50", "ms_p80", "status", "numel")


def _check_unique(frame: pd.DataFrame, name: str) -> None:
    dup = frame.duplicated(list(POINT_KEY), keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        key = ", ".join(f"{k}={first[k]}" for k in POINT_KEY)
        raise ValueError(f"{name}: {int(dup.sum())} rows share a point key (e.g. {key}); cannot match points")


def _label_row(row, threshold: float, slowdown: float) -> tuple[str, bool, str]:
    """(label, regression, note) for one merged row."""
    if row["_merge"] == "left_only":
        return "missing", False, "only in the baseline"
    if row["_merge"] == "right_only":
        return "missing", False, "only in the candidate"
    base_status, cand_status = row["status_base"], row["status_cand"]
    if base_status != "ok" or cand_status != "ok":
        broken = base_status == "ok" and cand_status in _BROKEN
        return "not-ok", broken, f"status {base_status} -> {cand_status}"
    if row["timer"] == "interpreter":
        return "untimed", False, "Triton interpreter: times mean nothing"
    b20, b50, b80 = row["ms_p20_base"], row["ms_p50_base"], row["ms_p80_base"]
    c20, c50, c80 = row["ms_p20_cand"], row["ms_p50_cand"], row["ms_p80_cand"]
    values = np.array([b20, b50, b80, c20, c50, c80], dtype=float)
    if not (np.isfinite(values).all() and (values > 0).all()):
        return "ambiguous", False, "a time or its p20/p80 band is missing"
    if c20 > b80:
        ratio = c50 / b50
        regression = ratio > (1 + threshold) * slowdown
        if regression:
            return "slower", True, f"{ratio - 1:+.1%} beyond threshold"
        if ratio > 1 + threshold:
            return "slower", False, f"{ratio - 1:+.1%}: within the machine change (up to {slowdown - 1:+.1%})"
        return "slower", False, f"{ratio - 1:+.1%}"
    if c80 < b20:
        return "faster", False, f"{c50 / b50 - 1:+.1%}"
    if b20 <= c50 <= b80 and c20 <= b50 <= c80:
        return "same", False, ""
    return "ambiguous", False, "bands overlap, medians outside each other's band"


def compare_runs(
    baseline: pd.DataFrame, candidate: pd.DataFrame, *, threshold: float = 0.10, slowdown: float = 1.0
) -> pd.DataFrame:
    """One row per point of either run: both runs' p20/p50/p80 and status, ``ratio`` (candidate / baseline
    median time; > 1 is slower), its noise band ``ratio_lo`` = c_p20/b_p80 .. ``ratio_hi`` = c_p80/b_p20,
    ``in_runs`` (both, baseline, candidate), ``label`` (see the module docstring), ``regression`` and a ``note``.
    ``slowdown`` (>= 1) is the slowdown a machine change alone explains (``bnbench.report.machine``)."""
    if not (isinstance(threshold, (int, float)) and np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0 (0.1 = 10%), got {threshold!r}")
    if not (isinstance(slowdown, (int, float)) and np.isfinite(slowdown) and slowdown >= 1):
        raise ValueError(f"slowdown must be a finite number >= 1, got {slowdown!r}")
    _check_unique(baseline, "baseline")
    _check_unique(candidate, "candidate")
    key = list(POINT_KEY)
    merged = baseline[key + list(_STATS)].merge(
        candidate[key + list(_STATS)], on=key, how="outer", suffixes=("_base", "_cand"), indicator=True
    )
    labels = [_label_row(row, threshold, slowdown) for _, row in merged.iterrows()]
    merged["label"] = [label for label, _, _ in labels]
    merged["regression"] = [regression for _, regression, _ in labels]
    merged["note"] = [note for _, _, note in labels]
    merged["ratio"] = merged["ms_p50_cand"] / merged["ms_p50_base"]
    merged["ratio_lo"] = merged["ms_p20_cand"] / merged["ms_p80_base"]
    merged["ratio_hi"] = merged["ms_p80_cand"] / merged["ms_p20_base"]
    untimed = ~merged["label"].isin(TIMED_LABELS)
    merged.loc[untimed, ["ratio", "ratio_lo", "ratio_hi"]] = np.nan
    merged["numel"] = merged["numel_base"].fillna(merged["numel_cand"])
    merged["in_runs"] = merged["_merge"].map({"both": "both", "left_only": "baseline", "right_only": "candidate"})
    merged = merged.drop(columns=["_merge", "numel_base", "numel_cand"])
    return sort_points(merged).reset_index(drop=True)


def has_regression(comparison: pd.DataFrame) -> bool:
    """Whether any point regressed (the exit code of ``bnbench report --baseline A --candidate B``)."""
    return bool(comparison["regression"].any())


def gate_failures(comparison: pd.DataFrame) -> list[str]:
    """Why the candidate does not pass (empty: it passes): regressions, baseline points missing from the
    candidate, or no point in common."""
    failures = []
    if not (comparison["in_runs"] == "both").any():
        failures.append(
            f"the runs share no point (baseline {int((comparison['in_runs'] == 'baseline').sum())}, candidate "
            f"{int((comparison['in_runs'] == 'candidate').sum())} points): nothing was compared"
        )
    else:
        missing = int((comparison["in_runs"] == "baseline").sum())
        if missing:
            failures.append(f"{missing} point(s) of the baseline are missing from the candidate")
    n_reg = int(comparison["regression"].sum())
    if n_reg:
        failures.append(f"{n_reg} regression(s)")
    return failures


def regressions(comparison: pd.DataFrame) -> pd.DataFrame:
    """The regressed points with their case, ratio and band."""
    rows = comparison[comparison["regression"]]
    columns = ["case", "provider", "timer", "ratio", "ratio_lo", "ratio_hi", "status_base", "status_cand", "note"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    return rows.assign(case=case_label(rows))[columns].reset_index(drop=True)


def compare_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per provider and timer: how many points got each label, regressions, and the geometric-mean time ratio
    over the points timed in both runs (candidate / baseline; < 1: the candidate is faster)."""
    rows = []
    for (provider, timer), group in comparison.groupby(["provider", "timer"], sort=False):
        counts = group["label"].value_counts()
        row = {"provider": provider, "timer": timer, "points": len(group)}
        row |= {label: int(counts.get(label, 0)) for label in LABELS}
        row["regressions"] = int(group["regression"].sum())
        row["geomean_ratio"] = geomean(group.loc[group["label"].isin(TIMED_LABELS), "ratio"])
        rows.append(row)
    columns = ["provider", "timer", "points", *LABELS, "regressions", "geomean_ratio"]
    table = pd.DataFrame(rows, columns=columns)
    return table.assign(dtype="", **{"pass": ""}).pipe(sort_points)[columns].reset_index(drop=True)


def provenance_table(baseline: pd.DataFrame, candidate: pd.DataFrame) -> pd.DataFrame:
    """Run id, commit, device and versions of both runs side by side."""
    fields = ("run_id", "git_sha", "device_name", "torch_version", "triton_version", "peak_copy_gbps")

    def values(frame: pd.DataFrame, column: str) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(frame[column].dropna())) or "(not recorded)"

    rows = [{"field": f, "baseline": values(baseline, f), "candidate": values(candidate, f)} for f in fields]
    return pd.DataFrame(rows, columns=["field", "baseline", "candidate"])


def compare_sections(
    comparison: pd.DataFrame,
    baseline: pd.DataFrame,
    candidate: pd.DataFrame,
    *,
    threshold: float,
    machine: MachineCheck | None = None,
) -> list[Section]:
    """The comparison as report sections: provenance and machine state, the verdict (the gate's failures), the
    per-provider summary, regressions, missing points and the full point-by-point table."""
    provenance = provenance_table(baseline, candidate)
    notes = []
    devices = provenance.set_index("field").loc["device_name"]
    if devices["baseline"] != devices["candidate"]:
        notes.append(Text("The runs used different devices: the ratios compare machines, not code."))
    if machine is not None:
        notes.append(Table(machine.table, caption="Machine state of each run (before and after it, where recorded):"))
        if machine.differs:
            notes.append(
                Text(
                    "The machine changed between the runs: " + "; ".join(machine.reasons) + ". A slower point is "
                    f"called a regression only beyond what that explains: a slowdown over {machine.slowdown:.3g}x "
                    f"times 1 + threshold. Rerun both on a quiet machine to compare the code itself."
                )
            )
    found = regressions(comparison)
    failures = gate_failures(comparison)
    verdict = (
        "Does not pass: " + "; ".join(failures) + "."
        if failures
        else f"Passes: no regression (threshold {threshold:.0%}; a point must also be slower outside its p20-p80 "
        "band) and every baseline point was measured in the candidate."
    )
    method = Text(
        "ratio = candidate median / baseline median (> 1: slower); band = candidate p20 / baseline p80 .. "
        "candidate p80 / baseline p20. slower/faster: the two p20-p80 bands do not overlap; same: each median "
        "lies in the other run's band; ambiguous: anything in between. A regression is a slower point beyond "
        "the threshold, or a point newly incorrect/error/oom."
    )
    missing = comparison[comparison["label"] == "missing"]
    points = comparison.assign(case=case_label(comparison))
    point_columns = ["case", "provider", "timer", "label", "regression", "ratio", "ratio_lo", "ratio_hi", "note"]
    sections = [
        Section("Runs", [Table(provenance), *notes]),
        Section("Verdict", [Text(verdict), method, Table(compare_summary(comparison))]),
    ]
    if len(found):
        sections.append(Section("Regressions", [Table(found)]))
    if len(missing):
        table = missing.assign(case=case_label(missing))[["case", "provider", "timer", "note"]]
        sections.append(
            Section("Missing points", [Text(f"{len(missing)} point(s) are in only one run."), Table(table)])
        )
    sections.append(Section("All points", [Table(points[point_columns])]))
    return sections
