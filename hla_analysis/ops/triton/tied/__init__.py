"""Tied HLA, M = 2: ``(q.k)^2 = <sym(q), sym(k)>`` with a packed symmetric state.

:mod:`.kernels` (Triton), :mod:`.autograd` (launchers, :class:`~.autograd.TiedHLAFunction`)
and :mod:`.naive` (the plain-torch twin).
"""
