"""bnbench.step: a full training step of a network (forward, loss, backward, optimizer step) timed under eager,
torch.compile, the fused layers (``convert_bn_act``) and the fused layers under torch.compile (``bnbench step``).

Modules, top to bottom: ``cli`` (the subcommand and this package's only file writer), ``measure`` (one checked,
timed configuration per provider; returns rows), ``check`` (loss and gradients against the float64 network),
``share`` (the BatchNorm + activation share of a step, from torch.profiler), ``training`` (the configuration
and the step itself), ``providers`` (how each provider prepares the network: a registry tests can extend).
Importing the package imports none of them.
"""
