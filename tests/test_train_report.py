"""The training report: figures for every experiment's frame, the effect plot, and summary.md's statements
(settings, method, the per-claim table and where our numbers disagree with the paper)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from bnbench.report.testing import synthetic_train
from bnbench.report.train import summary_markdown, train_figures, verdict_table
from bnbench.train.experiments import build_configs, run_configs


@pytest.fixture(scope="module")
def tiny_frame():
    """Every experiment, tiny (2 seeds, a dozen steps on digits): a real results frame."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    frames = []
    for experiment, extra in (("bn-paper", {"lrs": (0.1, 1.0, 3.0)}), ("depth", {"depths": (2, 3)}),
                              ("ics", {}), ("regularization", {}), ("batch-size", {"batch_sizes": (30, 60),
                               "steps": None, "norms": ("none", "eager", "layernorm")}), ("santurkar", {})):  # fmt: skip
        overrides = {"steps": 12, "eval_every": 6, "width": 8, "datasets": ("digits",)} | extra
        configs, _ = build_configs(experiment, "quick", seeds=2, device="cpu", overrides=overrides)
        frames.append(run_configs(configs).frame)
    torch.set_num_threads(before)
    return pd.concat(frames, ignore_index=True)


def test_figures_for_every_experiment(tiny_frame):
    figures = train_figures(tiny_frame)
    assert {"bn_paper_curves", "bn_paper_percentiles", "depth_sweep", "depth_grad_norms", "lr_sweep", "ics",
            "regularization", "batch_size", "santurkar_curves", "effects"} <= set(figures)  # fmt: skip
    assert all(isinstance(f, Figure) and f.axes for f in figures.values())
    units = {u for u in verdict_table(tiny_frame)["unit"] if u}
    assert len(figures["effects"].axes) <= len(units)  # one panel per unit: effects in one unit share an axis


def test_summary_states_the_settings_and_the_method(tiny_frame):
    specs = {"bn-paper": build_configs("bn-paper", "quick", seeds=2, device="cpu")[1]}
    meta = {"preset": "quick", "device": "cpu", "specs": specs, "environment": {"git_sha": "abc123"},
            "command": ["bnbench", "train"], "datasets": {"digits": "8x8 digits; 1293 train / 144 validation"}}  # fmt: skip
    text = summary_markdown(tiny_frame, meta)
    for needle in ("commit abc123", "1293 train / 144 validation", "weight decay 0", "dropout 0",
                   "momentum 0.1, eps 1e-05", "(constant: no schedule)", "interleaved", "## Verdict per claim",
                   "| claim | set-up | effect (95% CI) | verdict |", "## Where our numbers disagree",
                   "learning rate 0.1/0.3/1/3"):  # fmt: skip
        assert needle in text, needle
    verdicts = verdict_table(tiny_frame)
    assert f"{(verdicts['verdict'] == 'holds').sum()} holds" in text


def test_summary_of_the_synthetic_frame_the_report_page_uses():
    frame = synthetic_train()
    table = verdict_table(frame)
    assert set(table["experiment"]) == {"bn-paper"} and table["held"].map(lambda h: h in (True, False, None)).all()
    text = summary_markdown(frame)
    assert "BN reaches a higher test accuracy" in text
    assert all(math.isfinite(v) or math.isnan(v) for v in table["estimate"])


def test_the_report_does_not_import_the_experiments(tmp_path):
    """Dependencies run one way: bnbench.train's CLI uses the report, the report never imports bnbench.train."""
    import subprocess
    import sys

    code = ("import sys, bnbench.report.train, bnbench.report.verdicts; "
            "print([m for m in sys.modules if m.startswith('bnbench.train')])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.strip() == "[]"
