"""Numerical rational-approximation analysis (NumPy/SciPy): exp approximants, softmax rows, degrees."""

from hla_analysis.numeric.minimax import MinimaxRational, minimax_rational

__all__ = ["MinimaxRational", "minimax_rational"]
