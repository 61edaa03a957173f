"""Quadratic HLA, any M: FlashAttention-style tiles of the product of similarities, no state.

:mod:`.kernels` (Triton), :mod:`.autograd` (launchers, :func:`~.autograd.hla_quadratic_triton`)
and :mod:`.naive` (the plain-torch twins: the blockwise fallback :func:`~.naive.quadratic_torch`
and :func:`~.naive.hla` on the kernel's packed layout).
"""
