"""bnbench.report: tables, figures and pages from benchmark and training results.

Pure functions over results frames (columns in ``bnbench.schema``) return DataFrames and matplotlib Figures;
``load`` is the only module that reads files and ``cli`` (``bnbench report``) the only one that writes them.

- ``bench``: summary tables and ``summary_markdown``/``bench_figures`` of one benchmark run (used by the harness)
- ``bench_plots``: time vs batch, bandwidth vs bytes, speedup heatmaps
- ``scope``: whether a run is complete, and what a run without a GPU can and cannot show
- ``compare``, ``compare_plots``: baseline vs candidate, point by point, with noise bands and regressions
- ``machine``: whether the two runs' machines differed (copy bandwidth bands, device, GPU clocks, throttling)
- ``train``: the training experiments' verdict table and figures
- ``document``, ``html``: report sections rendered as Markdown and as a self-contained HTML page
- ``assemble``: whole reports from loaded result folders
- ``style``: one colour per provider and training norm, figure helpers
- ``testing``: synthetic frames in the results schemas, for tests

Importing this package imports nothing heavy; import the submodule you need.
"""
