"""``bnbench inspect``: what a case's Triton path launches and what the compiled code looks like, without a GPU.

The launchers run on CPU tensors under a recording Triton driver (:mod:`bnbench.kernels._driver`): the real binder,
specialisation, cache and compiler for the target, launches recorded instead of run. From the recorded launches:
the plan (path, tiles, grid, waves, launches per pass, hidden aten kernels, bytes against the floors) and the
compiled facts of each kernel (:mod:`bnbench.kernels._facts`). Also host microseconds per call beside eager.
Computation only; files are written by :mod:`bnbench.inspect.cli`.
"""
