"""bnbench.bench: the benchmark and profiling harness (``bnbench bench``, ``bnbench profile``).

Modules, top to bottom: ``cli`` (the bench subcommand and the harness's only file writer), ``profile`` (the profile
subcommand), ``runner`` (the checked sweep, returns DataFrames), ``distributed`` (the same sweep on every rank
of a torchrun process group: synchronised providers, global-batch reference, fixed-count timing), ``profiling`` (torch.profiler breakdowns),
``workload`` (inputs, passes, the float64 reference), ``providers`` (eager, compile, triton: a registry),
``timing`` (do_bench, wall clock, fixed-count, interpreter), ``bandwidth`` (copy bandwidth), ``bytes_model`` (minimal bytes),
``cases`` (cases, presets, parsing). Importing the package imports none of them.
"""
