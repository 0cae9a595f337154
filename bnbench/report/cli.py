"""``bnbench report``: tables, figures and an HTML page from result folders, or a baseline/candidate comparison.

The only module of ``bnbench.report`` that writes files (through the atomic writers of ``bnbench._io``).
Exit codes: 0 ok; 1 the candidate does not pass in compare mode (a regression, baseline points missing, no point
in common); 2 bad input or an --out that would overwrite another command's files (raised as
ValueError/FileNotFoundError and turned into exit code 2 by ``bnbench.cli``).
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

HELP = "tables, figures and an HTML page from result folders; run-to-run comparison"
DESCRIPTION = (
    "Report mode: 'bnbench report RESULTS_DIR... --out DIR' loads bench and/or train result folders, validates "
    "them against the results schema, and writes summary.md, PNG figures (SVG too with --svg) and index.html, a "
    "self-contained page. Compare mode: 'bnbench report --baseline A --candidate B --out DIR' matches the two "
    "bench runs point by point, labels each point faster/slower/same/ambiguous from the p20-p80 noise bands, "
    "writes summary.md, comparison.csv, a figure and index.html, and exits 1 when a point is slower by more than "
    "--threshold outside its noise band (or became incorrect/error/oom), when a baseline point is missing from the "
    "candidate, or when the runs share no point; else 0. The runs' machines (copy bandwidth, device, GPU clocks "
    "and throttling, from results.json) are compared first: a slowdown the machine change alone explains is "
    "not a regression. --out must be a new or empty folder, or an earlier report's folder (its files are "
    "replaced); a results folder (holding results.csv) is refused, so a report never overwrites a run's files."
)

EXIT_OK, EXIT_REGRESSION = 0, 1


def configure(parser) -> None:
    parser.add_argument("results", nargs="*", metavar="RESULTS_DIR", help="bench or train result folders")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: results/report/<UTC time>/, or results/compare/<UTC time>/ "
                        "in compare mode; results/ is git-ignored)")  # fmt: skip
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="compare mode: the reference bench run")  # fmt: skip
    parser.add_argument("--candidate", type=Path, default=None, metavar="DIR",
                        help="compare mode: the bench run under test")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=0.10, metavar="FRACTION",
                        help="compare mode: a point slower by more than this fraction (0.1 = 10%%) outside its noise "
                        "band is a regression")  # fmt: skip
    parser.add_argument("--svg", action="store_true", help="also write every figure as SVG")
    parser.add_argument("--title", default=None, help="page title (default: from the folder names)")


#: the files a report folder holds besides its figures; a folder holding results.csv is a run, never a report
_REPORT_MARKER = "index.html"
_FIGURE_SUFFIXES = (".png", ".svg")


def _default_out(kind: str) -> Path:
    from bnbench import _io

    return _io.RESULTS_ROOT / kind / f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def check_out(out: Path) -> None:
    """Refuse an --out that would overwrite another command's files: a file, a results folder (results.csv: a
    bench or train run, whose summary.md and figures a report would replace), a folder holding other files.
    An earlier report's folder (index.html, no results.csv) may be written again."""
    from bnbench import _io

    entries = _io.folder_entries(out)
    if "results.csv" in entries:
        raise ValueError(
            f"--out {out}: is a results folder (it holds results.csv); a report there would overwrite its "
            "summary.md and figures. Choose another --out."
        )
    if entries and _REPORT_MARKER not in entries:
        raise ValueError(
            f"--out {out}: is not empty and not an earlier report ({_io.describe_entries(entries)}); choose a new "
            "or empty folder"
        )


def _remove_stale_files(out: Path, written: list[Path]) -> None:
    """Figures and results copies an earlier report left in ``out`` that this one did not write (they would be
    read as current)."""
    keep = {p.resolve() for p in written}
    for path in out.iterdir():
        ours = path.suffix in _FIGURE_SUFFIXES or path.name.endswith("-results.csv")
        if ours and path.is_file() and path.resolve() not in keep:
            path.unlink()


def _write(report, out: Path, *, svg: bool) -> list[Path]:
    """Figures (PNG, and SVG on request), summary.md and index.html; the page embeds the same PNG bytes.
    Each run's results.csv the page links to is copied beside it; stale files of an earlier report in ``out``
    are removed."""
    from bnbench import _io
    from bnbench.report.document import to_markdown
    from bnbench.report.html import figure_png, render_html

    written, png = [], {}
    for stem, fig in report.figures.items():
        png[stem] = figure_png(fig)
        written.append(_io.write_bytes(out / f"{stem}.png", png[stem]))
        if svg:
            written.append(_io.write_figure(out / f"{stem}.svg", fig))
    written.append(_io.write_text(out / "summary.md", to_markdown(report.sections, title=report.title)))
    page = render_html(report.title, report.sections, subtitle=report.subtitle, png=png)
    written.append(_io.write_text(out / _REPORT_MARKER, page))
    for name, source in report.attachments.items():
        written.append(_io.write_bytes(out / name, source.read_bytes()))
    _remove_stale_files(out, written)
    return written


def run(args) -> int:
    # imported here: `bnbench --help` and the other subcommands need neither pandas nor matplotlib
    from bnbench import _io
    from bnbench.report.assemble import comparison_report, results_report
    from bnbench.report.load import load_result, newest_gpu_reference

    compare = args.baseline is not None or args.candidate is not None
    if compare:
        if args.baseline is None or args.candidate is None:
            raise ValueError(f"compare mode needs both --baseline and --candidate (got baseline={args.baseline}, "
                             f"candidate={args.candidate})")  # fmt: skip
        if args.results:
            raise ValueError(f"give either RESULTS_DIR... or --baseline/--candidate, not both (got {args.results})")
        if not args.threshold >= 0:
            raise ValueError(f"--threshold must be >= 0 (0.1 = 10%), got {args.threshold}")
        out = args.out or _default_out("compare")
        check_out(out)
        baseline, candidate = load_result(args.baseline), load_result(args.candidate)
        report, comparison, failures = comparison_report(
            baseline, candidate, threshold=args.threshold, title=args.title
        )
        with _io.folder_lock(out, "bnbench report --baseline/--candidate"):
            check_out(out)  # again, under the lock: another command may have written there meanwhile
            _write(report, out, svg=args.svg)
            _io.write_csv(out / "comparison.csv", comparison)
        counts = comparison["label"].value_counts()
        summary = ", ".join(f"{int(n)} {label}" for label, n in counts.items())
        n_reg = int(comparison["regression"].sum())
        print(f"{len(comparison)} points: {summary}; {n_reg} regression(s) (threshold {args.threshold:.0%})")
        machine = report.machine
        if machine is not None and machine.differs:
            print(f"machine changed between the runs: {'; '.join(machine.reasons)}")
        print(f"report written to {out}/ (summary.md, index.html, comparison.csv)")
        if failures:
            print(f"bnbench report: the candidate does not pass: {'; '.join(failures)}", file=sys.stderr)
            return EXIT_REGRESSION
        return EXIT_OK
    if not args.results:
        raise ValueError("give one or more RESULTS_DIR, or --baseline A --candidate B")
    out = args.out or _default_out("report")
    check_out(out)
    results = [load_result(path) for path in args.results]
    report = results_report(results, title=args.title, gpu=newest_gpu_reference())
    with _io.folder_lock(out, "bnbench report"):
        check_out(out)
        written = _write(report, out, svg=args.svg)
    print(f"report of {len(results)} result folder(s) written to {out}/ ({len(written)} files; open index.html)")
    return EXIT_OK
