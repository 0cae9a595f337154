"""Assemble whole reports from loaded results: the sections (text, tables, figures) that ``summary.md`` and
``index.html`` render, for a set of result folders or for a baseline/candidate comparison. Pure: no file I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bnbench.report.bench import bench_figures, bench_sections, points_table, sidecar_environment
from bnbench.report.compare import compare_runs, compare_sections, gate_failures
from bnbench.report.compare_plots import compare_figures
from bnbench.report.document import FigureRef, Link, Section, Table, Text
from bnbench.report.load import RESULTS_CSV, Result
from bnbench.report.machine import MachineCheck, check_machines, run_machine
from bnbench.report.points import device_label
from bnbench.report.scope import GpuReference, completeness

__all__ = ["Report", "comparison_report", "results_report", "train_overview"]


@dataclass(frozen=True)
class Report:
    """A whole report: its sections, the machine check of a comparison, and ``attachments``: files to copy
    beside the page (name there -> source path), such as each run's results.csv that the page links to."""

    title: str
    subtitle: str
    sections: list[Section]
    machine: MachineCheck | None = None
    attachments: dict[str, Path] = field(default_factory=dict)

    @property
    def figures(self) -> dict[str, Any]:
        """Every figure of the report by file stem (stems are unique within a report)."""
        return {item.stem: item.figure for s in self.sections for item in s.items if isinstance(item, FigureRef)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "result"


def train_overview(df: pd.DataFrame) -> pd.DataFrame:
    """Per experiment: data set, model, norms, seeds, runs (distinct configurations x seeds), steps, metrics."""
    config = ["model", "depth", "width", "activation", "norm", "lr", "batch_size", "seed"]
    rows = []
    for experiment, group in df.groupby("experiment", sort=False):
        rows.append(
            {
                "experiment": experiment,
                "dataset": ", ".join(map(str, dict.fromkeys(group["dataset"]))),
                "norms": ", ".join(map(str, dict.fromkeys(group["norm"]))),
                "seeds": group["seed"].nunique(),
                "runs": len(group[config].drop_duplicates()),
                "max_step": group["step"].max(),
                "metrics": ", ".join(map(str, dict.fromkeys(group["metric"]))),
            }
        )
    return pd.DataFrame(rows)


def _csv_copy_name(result: Result, prefix: str) -> str:
    """The name of a run's results.csv copy beside the page: never ``results.csv`` itself, so a report folder is
    never mistaken for a results folder."""
    return f"{prefix or _slug(result.name) + '-'}{RESULTS_CSV}"


def _bench_part(result: Result, prefix: str, level: int, gpu: GpuReference | None, csv_name: str) -> list[Section]:
    model_calls = result.meta.get("model_bn_calls")
    sections = bench_sections(result.frame, level=level, model_calls=model_calls, meta=result.meta, gpu=gpu)
    figures = [FigureRef(prefix + stem, fig, _bench_caption(stem)) for stem, fig in bench_figures(result.frame).items()]
    if figures:
        sections.append(Section("Figures", figures, level))
    else:
        sections.append(Section("Figures", [Text("No timed points: no figures.")], level))
    data = [
        Link(f"{csv_name}: every point of this run (a copy of {result.path / RESULTS_CSV})", csv_name),
        Table(points_table(result.frame)),
    ]
    sections.append(Section("All points", data, level))
    return sections


def _bench_caption(stem: str) -> str:
    return {
        "time_vs_batch": "Median time vs batch size per width (band: p20-p80).",
        "bandwidth": "Effective bandwidth vs bytes moved, with the measured copy bandwidth.",
        "speedup_vs_eager": "Speedup of the fused kernels over eager, batch x width.",
        "speedup_vs_compile": "Speedup of the fused kernels over torch.compile, batch x width.",
    }.get(stem, stem)


def _held_text(held) -> str:
    if held is None or (isinstance(held, float) and held != held):
        return "inconclusive"
    return "yes" if bool(held) else "no"


def _train_part(result: Result, prefix: str, level: int) -> list[Section]:
    from bnbench.report import train as module

    verdict = module.verdict_table(result.frame)
    if "held" in verdict.columns:  # True / False / None (the results cannot decide)
        verdict = verdict.assign(held=verdict["held"].map(_held_text))
    figures = module.train_figures(result.frame)
    sections = [
        Section("Experiments", [Table(train_overview(result.frame))], level),
        Section("Verdict per claim", [Table(verdict)], level),
    ]
    env = sidecar_environment(result.meta)
    if len(env):
        sections.append(Section("Environment recorded in results.json", [Table(env)], level))
    refs = [FigureRef(prefix + stem, fig, stem.replace("_", " ")) for stem, fig in figures.items()]
    sections.append(Section("Figures", refs or [Text("The training report made no figures.")], level))
    return sections


def _step_part(result: Result, prefix: str, level: int) -> list[Section]:
    from bnbench.report.step import step_figures, step_sections

    sections = step_sections(result.frame, level=level)
    refs = [FigureRef(prefix + stem, fig, stem.replace("_", " ")) for stem, fig in step_figures(result.frame).items()]
    sections.append(Section("Figures", refs or [Text("No timed rows: no figures.")], level))
    return sections


def results_report(results: Sequence[Result], *, title: str | None = None, gpu: GpuReference | None = None) -> Report:
    """A report of one or more bench/step/train result folders, one part per folder. ``gpu``: the newest
    committed GPU benchmark, quoted in the part of a bench run that had no GPU."""
    if not results:
        raise ValueError("no result folders given")
    sections: list[Section] = []
    attachments: dict[str, Path] = {}
    single = len(results) == 1
    for i, result in enumerate(results, start=1):
        prefix = "" if single else f"{i}-{_slug(result.name)}-"
        level = 2 if single else 3
        if not single:
            what = {"bench": "benchmark run", "step": "training-step benchmark"}.get(
                result.kind, "training experiments"
            )
            sections.append(Section(f"{result.name} ({result.kind})", [Text(f"{what}: {result.path.resolve()}")], 2))
        if result.kind == "bench":
            csv_name = _csv_copy_name(result, prefix)
            sections += _bench_part(result, prefix, level, gpu, csv_name)
            attachments[csv_name] = result.path / RESULTS_CSV
        elif result.kind == "step":
            sections += _step_part(result, prefix, level)
        else:
            sections += _train_part(result, prefix, level)
    kinds = ", ".join(dict.fromkeys(r.kind for r in results))
    devices = [device_label(r.frame) for r in results if r.kind in ("bench", "step")]
    subtitle = f"{len(results)} result folder(s) ({kinds})" + (
        f"; devices: {', '.join(dict.fromkeys(devices))}" if devices else ""
    )
    default = f"bnbench report: {results[0].name}" if single else "bnbench report"
    return Report(title or default, subtitle, sections, attachments=attachments)


def comparison_report(
    baseline: Result, candidate: Result, *, threshold: float = 0.10, title: str | None = None
) -> tuple[Report, pd.DataFrame, list[str]]:
    """(report, point-by-point comparison frame, the gate's failures: empty when the candidate passes) for two
    bench folders. The runs' machines are checked first (``bnbench.report.machine``): a slowdown that a machine
    change alone explains is not a regression."""
    for role, result in (("baseline", baseline), ("candidate", candidate)):
        if result.kind != "bench":
            raise ValueError(
                f"{role} {result.path}: is a {result.kind} results folder; only bench runs can be compared"
            )
    machine = check_machines(run_machine(baseline.frame, baseline.meta), run_machine(candidate.frame, candidate.meta))
    comparison = compare_runs(baseline.frame, candidate.frame, threshold=threshold, slowdown=machine.slowdown)
    sections = compare_sections(comparison, baseline.frame, candidate.frame, threshold=threshold, machine=machine)
    runs = sections[0]  # "Runs": each run's completeness beside its provenance
    states = [
        Text(f"{role}: {completeness(r.frame, r.meta)}")
        for role, r in (("Baseline", baseline), ("Candidate", candidate))
    ]
    sections[0] = Section(runs.title, [*runs.items, *states], runs.level)
    device = device_label(candidate.frame)
    heading = f"{candidate.name} vs {baseline.name} on {device}"
    figures = compare_figures(comparison, threshold=threshold, title=heading)
    if figures:
        refs = [FigureRef(stem, fig, "Time ratio per point, candidate / baseline.") for stem, fig in figures.items()]
        sections.insert(2, Section("Figure", refs))
    subtitle = f"baseline {baseline.path}; candidate {candidate.path}; threshold {threshold:.0%}"
    report = Report(title or f"bnbench comparison: {heading}", subtitle, sections, machine=machine)
    return report, comparison, gate_failures(comparison)
