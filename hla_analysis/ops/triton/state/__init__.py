"""HLA with one or two factors through a state (Khatri-Rao features, never stored).

:mod:`.kernels` (Triton), :mod:`.autograd` (launchers, :class:`~.autograd.HLAFunction`),
:mod:`.steps` (the same pipeline as separate differentiable steps, for sequence parallelism)
and :mod:`.naive` (the plain-torch twin of both).
"""
