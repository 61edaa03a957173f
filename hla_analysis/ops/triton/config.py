"""Kernel configuration and the launch plans the fused ops share.

:class:`KernelConfig` (block sizes and schedule of one problem, checked when made) and
:func:`default_config` (the measured defaults), used by the state kernels
(:mod:`.state.autograd`) and, with ``TIED_TP`` added by :func:`.tied.autograd.tied_config`,
by the tied kernels (:mod:`.tied.autograd`). The plans below (chunks, causal state sweeps,
token splits of a non-causal state) are shared by both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelConfig(Mapping):
    """Block sizes and schedule of one fused HLA problem: immutable, and checked when made.

    Field names are the kernels' ``tl.constexpr`` names. ``*_BLOCK_*`` tile sizes,
    ``*_WARPS``, ``STAGES`` (software pipelining), ``CHUNK`` (causal chunk), ``SPLITS`` (token
    splits of the non-causal state; ``None`` = about two programs per SM), ``CAUSAL_STATE``
    ("auto" | "sequential" | "parallel"), ``PER_A`` (column kernels, M = 2; the causal apply
    always uses tiles), ``STATE_BA`` (columns per state program: 1, 2 or 4), ``STATE_TRANS``
    (operand orientation of the column state kernel, 0 or 1, see :func:`.state.kernels._cols_step`),
    ``STATE_KERNEL`` ("cols" | "tiles": the state kernel when ``PER_A``) and ``TIED_TP`` (folded
    rows of the tied kernels, set by :func:`.tied.autograd.tied_config`).

    A read-only mapping, so the launchers read ``cfg["CHUNK"]``; :meth:`replace` makes a changed
    copy and refuses unknown keys and out-of-range values with a one-line error.

    >>> cfg = default_config(r1=16, r2=16, dv=16, causal=False, dtype=torch.float32)
    >>> cfg.replace(SPLITS=3)["SPLITS"]
    3
    >>> cfg.replace(STATE_TRANS=2)
    Traceback (most recent call last):
    ...
    ValueError: kernel config STATE_TRANS=2 is not one of (0, 1).
    """

    STATE_BLOCK_N: int
    STATE_BLOCK_C: int
    STATE_BLOCK_DV: int
    APPLY_BLOCK_M: int
    APPLY_BLOCK_C: int
    GRAD_BLOCK_M: int
    GRAD_BLOCK_C: int
    BLOCK_N: int
    CHUNK: int
    STATE_WARPS: int
    APPLY_WARPS: int
    GRAD_WARPS: int
    STAGES: int
    PER_A: bool
    STATE_BA: int
    STATE_TRANS: int
    SPLITS: int | None = None
    CAUSAL_STATE: str = "auto"
    STATE_KERNEL: str = "cols"
    TIED_TP: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value, choices = getattr(self, f.name), _CHOICES.get(f.name)
            if choices is not None:
                if value not in choices or type(value) is not type(choices[0]):
                    raise ValueError(f"kernel config {f.name}={value!r} is not one of {choices}.")
            elif not (value is None and f.name in _OPTIONAL_INTS) and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"kernel config {f.name}={value!r} must be a positive int"
                                 + (" or None." if f.name in _OPTIONAL_INTS else "."))

    def replace(self, **changes) -> KernelConfig:
        """A copy with ``changes`` (checked; unknown keys refused)."""
        unknown = sorted(set(changes) - set(self))
        if unknown:
            raise ValueError(f"unknown kernel config key(s) {unknown}; known keys: {sorted(self)}.")
        return dataclasses.replace(self, **changes)

    def __getitem__(self, key: str):
        if key not in _FIELD_SET:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)


_CHOICES = {"STATE_TRANS": (0, 1), "STATE_BA": (1, 2, 4), "PER_A": (False, True),
            "CAUSAL_STATE": ("auto", "sequential", "parallel"), "STATE_KERNEL": ("cols", "tiles")}
_OPTIONAL_INTS = ("SPLITS", "TIED_TP")
_FIELDS = tuple(f.name for f in fields(KernelConfig))
_FIELD_SET = frozenset(_FIELDS)


def default_config(*, r1: int, r2: int, dv: int, causal: bool, dtype: torch.dtype,
                   tied: bool = False) -> KernelConfig:
    """Block sizes and schedule for one problem (:class:`KernelConfig`).

    Memoised (a config is immutable, and building and checking one is host time on every call);
    the key includes whether the interpreter runs.

    Small blocks under the interpreter (each program costs interpreter time; the CPU tests
    stay short, and they take the column kernels so that CI covers them). On a GPU, bf16/fp16
    non-causal M = 2 problems with ``r2 >= 32`` take the column-at-a-time kernels
    (``PER_A``), everything else the tile kernels; each choice was the faster one in
    ``benchmarks/gpu/tune_hla.py`` on an H200 (``benchmarks/gpu/results/``). Overrides go
    through ``hla_triton(..., config=...)`` (:meth:`KernelConfig.replace`).
    """
    return _default_config(int(r1), int(r2), int(dv), bool(causal), dtype, bool(tied), _interpreting())


@functools.lru_cache(maxsize=256)
def _default_config(r1: int, r2: int, dv: int, causal: bool, dtype: torch.dtype, tied: bool,
                    interpreting: bool) -> KernelConfig:
    if interpreting:
        block_c = 16 if r2 == 1 else max(r2, 16)
        return KernelConfig(STATE_BLOCK_N=16, STATE_BLOCK_C=block_c, STATE_BLOCK_DV=dv, APPLY_BLOCK_M=16,
                            APPLY_BLOCK_C=block_c, GRAD_BLOCK_M=16, GRAD_BLOCK_C=block_c, BLOCK_N=16, CHUNK=32,
                            SPLITS=None, STATE_WARPS=4, APPLY_WARPS=4, GRAD_WARPS=4, STAGES=1,
                            PER_A=True, STATE_BA=2, STATE_TRANS=0)
    r = r1 * r2
    if dtype == torch.float32:  # 4-byte tiles: half the blocks, or shared memory overflows
        return KernelConfig(STATE_BLOCK_N=32, STATE_BLOCK_C=64, STATE_BLOCK_DV=dv, APPLY_BLOCK_M=64,
                            APPLY_BLOCK_C=64, GRAD_BLOCK_M=64, GRAD_BLOCK_C=64, BLOCK_N=32, CHUNK=512, SPLITS=None,
                            STATE_WARPS=4, APPLY_WARPS=4, GRAD_WARPS=4, STAGES=2,
                            PER_A=False, STATE_BA=1, STATE_TRANS=0)
    cfg = dict(
        # tile kernels: picked by the block-size sweep of session 1 (H200, r = 64, N = 32760)
        STATE_BLOCK_N=128, STATE_BLOCK_C=128, STATE_BLOCK_DV=dv,
        APPLY_BLOCK_M=128, APPLY_BLOCK_C=128,
        GRAD_BLOCK_M=128, GRAD_BLOCK_C=64,
        BLOCK_N=64, CHUNK=1024 if r >= 2048 else 512, SPLITS=None,
        STATE_WARPS=8, APPLY_WARPS=8, GRAD_WARPS=8, STAGES=3,
        PER_A=False, STATE_BA=2, STATE_TRANS=0,
    )
    if causal and r1 * r2 >= 128 * 128:
        # r = 128 causal: the tile kernels' default blocks asked for 278 KB of shared memory
        # (OutOfResources on an H200, 227 KB per block); half the row and key blocks and two
        # stages fit (issue 10, item 3)
        cfg.update(APPLY_BLOCK_M=64, BLOCK_N=32, GRAD_BLOCK_M=64, GRAD_BLOCK_C=64, STATE_BLOCK_C=64, STAGES=2)
    if not causal and not tied and r2 >= 32:
        # column kernels (benchmarks/gpu/tune_hla.py, H200, r = 64, N = 32760): four columns per
        # state program (two at r2 = 128, or the accumulators spill), values as the shared operand
        cfg.update(PER_A=True, STATE_BA=4 if r2 <= 64 else 2, STATE_WARPS=8, STATE_TRANS=1,
                   APPLY_WARPS=4, GRAD_BLOCK_M=64, GRAD_WARPS=4)
        if dv <= 64:  # session 11 sweep (r = 64, dv = 64, N = 32760): 1.76 ms against 1.89 with four
            cfg.update(STATE_BA=2)
    elif causal and dv <= 64 and r1 * r2 < 128 * 128:  # same sweep, causal: 2.24 ms against 2.60 with 8 warps
        cfg.update(STATE_WARPS=4)
    return KernelConfig(**cfg)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _causal_state_plan(cfg: dict, programs: int, block_dv: int, dv: int, device) -> tuple[int, int, bool]:
    """Plan a causal state sweep over ``programs`` (state tiles x heads) programs per value block.

    Splits the value columns until the chip is full (``block_dv`` halves, down to 32), and says
    whether to sum each chunk in parallel and scan the chunk sums, which pays when there are
    too few programs for one sequential sweep (small states); ``CAUSAL_STATE`` forces either.
    Returns ``(block_dv, grid_d, parallel)``.
    """
    sms, grid_d = _num_sms(device), dv // block_dv
    while programs * grid_d < sms and block_dv > 32:
        block_dv //= 2
        grid_d = dv // block_dv
    how = cfg.get("CAUSAL_STATE", "auto")
    return block_dv, grid_d, how == "parallel" or (how == "auto" and 2 * programs * grid_d < sms)


def _split_plan(n: int, programs: int, cfg: dict, device) -> tuple[int, int]:
    """Token splits for a non-causal state reduction: ``(splits, tokens_per_split)``.

    Enough splits to give about two programs per SM, each split a whole number of
    ``STATE_BLOCK_N`` blocks and at least four of them; ``cfg["SPLITS"]`` overrides the count.
    """
    block = cfg["STATE_BLOCK_N"]
    splits = cfg["SPLITS"]
    if splits is None:
        want = 2 * _num_sms(device)
        splits = max(1, min(math.ceil(want / programs), n // (4 * block)))
    tps = math.ceil(math.ceil(n / splits) / block) * block
    return max(1, math.ceil(n / tps)), tps


def _chunks(n: int, causal: bool, cfg: dict) -> int:
    return math.ceil(n / cfg["CHUNK"]) if causal else 1
