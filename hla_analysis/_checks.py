"""Input checks shared by every public operator.

Each check raises a ``ValueError`` that names what is wrong and what to do instead: the
toolkit never returns a silent NaN or a silently wrong number.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

# -- one host sync per call --------------------------------------------------------------
# The public operators check values (NaN/Inf, normalisers, outputs) through a CheckBatch:
# each check adds one or two 0-d *values* computed on the device by a single reduction (a
# sum, an amin, an aminmax) and a host-side predicate on them. The batch stacks the values
# and reads them with a single .tolist() at the end; the predicates run on the host. Only
# when a predicate fails do the detailed checks run (which input, how many rows), in the
# order they were added, so the first problem found is the one reported. A value may fail
# without a problem (a sum that overflowed); then every detailed check passes and the
# result is returned. Disabled batches (checks_disabled) compute no values at all.
#
# Cost per call (issue 10, item 1): one reduction per checked tensor, one stack, one sync.
# The bool-flag form it replaces spent three to five small device ops per check.

_state = threading.local()


class CheckBatch:
    """Value checks of one public call, resolved with at most one host sync."""

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled
        self.values: list[Tensor] = []
        self.predicates: list[tuple[int, int, Callable[..., bool]]] = []
        self.diagnoses: list[Callable[[], None]] = []

    def add(self, flag: Tensor | None, diagnose: Callable[[], None]) -> None:
        """``flag``: 0-d bool, True when fine (None: the problem shows in a later value)."""
        if not self.enabled:
            return
        if flag is None:
            self.diagnoses.append(diagnose)
            return
        self.add_values((flag,), lambda ok: ok != 0, diagnose)

    def add_values(self, values: Sequence[Tensor], predicate: Callable[..., bool],
                   diagnose: Callable[[], None]) -> None:
        """0-d device ``values`` and a host ``predicate(*floats)`` that is True when fine."""
        if not self.enabled:
            return
        start = len(self.values)
        self.values.extend(values)
        self.predicates.append((start, len(self.values), predicate))
        self.diagnoses.append(diagnose)

    def resolve(self) -> None:
        if not self.values:
            return
        if len(self.values) == 1:  # the kernels' one flag vector: one .item(), no stack or cast
            ok = self.predicates[0][2](float(self.values[0].item()))
            if not ok:
                for diagnose in self.diagnoses:
                    diagnose()
            return
        device = self.values[0].device
        groups: dict[tuple, list[int]] = {}  # one stack per (dtype, device), one cast each
        for i, v in enumerate(self.values):
            groups.setdefault((v.dtype, v.device), []).append(i)
        parts, order = [], []
        for idx in groups.values():
            stacked = torch.stack([self.values[i] for i in idx]) if len(idx) > 1 else self.values[idx[0]].reshape(1)
            parts.append(stacked.to(device=device, dtype=torch.float32))
            order.extend(idx)
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()  # the one host sync
        read = [0.0] * len(flat)
        for pos, i in enumerate(order):
            read[i] = flat[pos]
        if all(pred(*read[a:b]) for a, b, pred in self.predicates):
            return
        for diagnose in self.diagnoses:
            diagnose()


def defer_check(flag: Callable[[], Tensor], diagnose: Callable[[], None]) -> None:
    """One value check: ``flag()`` (0-d, True when fine) joins the active batch's one host read
    and ``diagnose`` (which raises if something is wrong) runs only when it fails; without a
    batch ``diagnose`` runs now; with checks off, nothing runs."""
    batch, skip = _active_or_none()
    if skip:
        return
    if batch is None:
        diagnose()
    else:
        batch.add(flag(), diagnose)


def _current() -> CheckBatch | None:
    return getattr(_state, "batch", None)


def _active_or_none():
    """``(batch, skip)``: the batch (or None outside one), and whether value checks are off."""
    batch = getattr(_state, "batch", None)
    return batch, batch is not None and not batch.enabled


@contextmanager
def check_batch() -> Iterator[CheckBatch]:
    """The active batch, or a new one resolved when the outermost block exits without error."""
    outer = _current()
    if outer is not None:
        yield outer
        return
    batch = CheckBatch(enabled=getattr(_state, "enabled", True))
    _state.batch = batch
    try:
        yield batch
    finally:
        _state.batch = None
    batch.resolve()


@contextmanager
def _thread_flag(name: str, value: bool, *, default: bool) -> Iterator[None]:
    """Set this thread's flag ``name`` to ``value`` inside the block; restore it after."""
    before = getattr(_state, name, default)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, before)


def checks_disabled():
    """Internal switch for benchmarks: skip the value checks of the public operators.

    Shape and option checks still run; NaN/Inf inputs, bad normalisers and overflowed
    outputs then go unnoticed. Never use it outside timing code.
    """
    return _thread_flag("enabled", False, default=True)


def sum_value(x: Tensor) -> Tensor:
    """0-d float sum of ``x`` on the device: finite iff no NaN/Inf (or overflowing sum).

    A sum is non-finite whenever one term is (Inf + finite = Inf, Inf - Inf = NaN), so one
    reduction replaces ``isfinite(x).all()`` without building a bool tensor.
    """
    return x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32))


def require_finite(name: str, x: Tensor, *, propagates: bool = False) -> None:
    """:func:`check_finite`, deferred to the active batch if there is one.

    ``propagates=True`` says a NaN/Inf in ``x`` always reaches a later flagged tensor (the
    normaliser or the output: IEEE products and sums keep NaN/Inf, also times zero), so no
    flag of its own is needed and the detailed check runs only once something is wrong.
    """
    batch, skip = _active_or_none()
    if skip:
        return
    if batch is None:
        check_finite(name, x)
    elif propagates:
        batch.add(None, lambda: check_finite(name, x))
    else:
        batch.add_values((sum_value(x),), math.isfinite, lambda: check_finite(name, x))


def check_stacked_against_values(qs, v: Tensor) -> None:
    """Refuse the one ambiguous call: a bare tensor whose leading dims are fewer than v's.

    ``hla(q, k, v)`` with ``q`` of shape ``[B, N, r]`` reads ``B`` as the factor count M. If
    ``v`` then has more leading dims than the factors, the caller most likely meant ``B`` as a
    batch dim; say so instead of returning a number for the other reading.
    """
    if isinstance(qs, Tensor) and qs.dim() >= 3 and v.dim() - 2 > qs.dim() - 3:
        raise ValueError(
            f"a single tensor {tuple(qs.shape)} is read as stacked factors [..., M, N, r] with "
            f"M={qs.shape[-3]}, but v {tuple(v.shape)} has more leading dims than the factors. "
            "For one factor with a batch dim pass [q], [k] (or use linear_attention); for stacked "
            "factors shared across v's batch pass list(qs.unbind(-3))."
        )


def as_factors(factors: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """Turn ``[..., M, N, r]`` or a sequence of ``M`` tensors ``[..., N, r_m]`` into a list."""
    if isinstance(factors, Tensor):
        if factors.dim() < 3:
            raise ValueError(
                f"{name}: a single tensor is read as stacked factors [..., M, N, r] and needs "
                f"at least 3 dims, got shape {tuple(factors.shape)}. For one factor pass a list "
                f"[{name[:-1]}] or use linear_attention."
            )
        return list(factors.unbind(-3))
    factors = list(factors)
    if not factors:
        raise ValueError(f"{name} is empty: pass at least one factor (M >= 1).")
    for m, f in enumerate(factors):
        if not isinstance(f, Tensor) or f.dim() < 2:
            raise ValueError(
                f"{name}[{m}] must be a tensor [..., N, r], got "
                f"{type(f).__name__}{tuple(f.shape) if isinstance(f, Tensor) else ''}."
            )
    return factors


def check_float(name: str, x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; attention needs a floating dtype (cast with .float()).")


def check_finite(name: str, x: Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/Inf value(s) (shape {tuple(x.shape)}); "
            "clean or rescale the inputs before computing attention."
        )


def check_scale(scale, dim: int) -> float:
    """The logit scale as a float: ``1/sqrt(dim)`` by default, else finite and > 0.

    Zero would make every logit 0 (a uniform map that ignores q and k); a negative scale
    reverses the ranking of keys.
    """
    if scale is None:
        return dim ** -0.5
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number (default 1/sqrt(d)), got {scale!r}.") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"scale must be a finite positive number (default 1/sqrt(d) = {dim ** -0.5:.4g}), got {value}; "
            "0 would give a uniform map that ignores q and k, a negative scale reverses the key order."
        )
    return value


def broadcast_leading(named: dict[str, Tensor]) -> torch.Size:
    """The broadcast of all leading (batch/head) dims, with an error naming the culprits."""
    shapes = {t.shape[:-2] for t in named.values()}
    if len(shapes) == 1:  # the common case; torch.broadcast_shapes costs ~60 us of host time
        return shapes.pop()
    try:
        return torch.broadcast_shapes(*(t.shape[:-2] for t in named.values()))
    except RuntimeError:
        shapes = ", ".join(f"{n}{tuple(t.shape)}" for n, t in named.items())
        raise ValueError(
            f"leading (batch/head) dims do not broadcast: {shapes}. Layout is [..., N, D]; "
            "make the leading dims equal or 1."
        ) from None


def check_pair(
    q: Tensor, k: Tensor, *, qname: str = "q", kname: str = "k", propagates: bool = False
) -> None:
    """Check one query/key pair: float, finite, same width and dtype, non-empty, d >= 1.

    The finiteness check is deferred to the active :class:`CheckBatch` if there is one
    (``propagates``: see :func:`require_finite`).
    """
    for n, t in ((qname, q), (kname, k)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{n} must be a torch.Tensor [..., N, d], got {type(t).__name__}; "
                             "wrap it with torch.as_tensor.")
        if t.dim() < 2:
            raise ValueError(f"{n} must be [..., N, d], got shape {tuple(t.shape)}.")
        check_float(n, t)
        if t.shape[-2] == 0:
            raise ValueError(f"{n} is an empty sequence (N = 0, shape {tuple(t.shape)}); pass at least one token.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{qname} has feature width {q.shape[-1]} but {kname} has {k.shape[-1]} "
            f"(shapes {tuple(q.shape)} and {tuple(k.shape)}); they must match."
        )
    if q.shape[-1] == 0:
        raise ValueError(
            f"{qname} and {kname} have feature width 0 (shapes {tuple(q.shape)}, {tuple(k.shape)}); "
            "pass at least one feature per token (d >= 1)."
        )
    if q.dtype != k.dtype:
        raise ValueError(
            f"{qname} is {q.dtype} but {kname} is {k.dtype}; cast both to one floating dtype "
            f"(e.g. {kname}.to({qname}.dtype))."
        )
    for n, t in ((qname, q), (kname, k)):
        require_finite(n, t, propagates=propagates)


def check_factor_lists(qs: list[Tensor], ks: list[Tensor], *, propagates: bool = False) -> None:
    if len(qs) != len(ks):
        raise ValueError(
            f"qs has M={len(qs)} factor(s) but ks has M={len(ks)}; every query factor needs a key factor."
        )
    nq = {f.shape[-2] for f in qs}
    nk = {f.shape[-2] for f in ks}
    if len(nq) > 1 or len(nk) > 1:
        raise ValueError(
            f"all factors must have the same number of tokens: query factors have N in {sorted(nq)}, "
            f"key factors N in {sorted(nk)}."
        )
    seen: set[tuple[int, int]] = set()
    for m, (fq, fk) in enumerate(zip(qs, ks)):
        if (id(fq), id(fk)) in seen:  # tied factors: one check per distinct tensor pair
            continue
        seen.add((id(fq), id(fk)))
        check_pair(fq, fk, qname=f"qs[{m}]", kname=f"ks[{m}]", propagates=propagates)
    broadcast_leading({**{f"qs[{m}]": f for m, f in enumerate(qs)}, **{f"ks[{m}]": f for m, f in enumerate(ks)}})


def check_values(v: Tensor, n_keys: int, *, propagates: bool = False) -> None:
    if not isinstance(v, Tensor):
        raise ValueError(f"v must be a torch.Tensor [..., N, dv], got {type(v).__name__}; "
                         "wrap it with torch.as_tensor.")
    if v.dim() < 2 or v.shape[-2] != n_keys:
        raise ValueError(
            f"v must be [..., N, dv] with N = {n_keys} (the number of keys), got shape {tuple(v.shape)}."
        )
    check_float("v", v)
    require_finite("v", v, propagates=propagates)


def query_positions(query_offset: int | Tensor, n_queries: int, device: torch.device | None = None) -> Tensor:
    """Each query row's global position: ``query_offset + i``, or the given 1-D integer tensor.

    A tensor ``query_offset`` names every row's position itself, so rows need not be contiguous
    (e.g. several runs of a long input scored as one block).
    """
    if isinstance(query_offset, Tensor) and query_offset.dim() > 0:
        positions = query_offset.long()  # index_select takes int32/int64 only
        return positions if device is None else positions.to(device)
    start = operator.index(query_offset)
    return torch.arange(start, start + n_queries, device=device)


def _check_query_offset(query_offset: int | Tensor, n_queries: int, n_keys: int, *, causal: bool) -> None:
    """Refuse offsets that would leave a causal row without keys, or positions past the keys."""
    if not isinstance(query_offset, Tensor) or query_offset.dim() == 0:
        try:
            if isinstance(query_offset, bool) or getattr(query_offset, "dtype", None) == torch.bool:
                raise TypeError
            query_offset = operator.index(query_offset)
        except TypeError:
            raise ValueError(f"query_offset must be an int or a 1-D integer tensor, got {query_offset!r}.") from None
        if query_offset < 0:
            raise ValueError(f"query_offset must be >= 0, got {query_offset}.")
        if causal and query_offset + n_queries > n_keys:
            raise ValueError(
                f"causal attention with {n_queries} queries at offset {query_offset} needs at least "
                f"{query_offset + n_queries} keys, got {n_keys}."
            )
        return
    if query_offset.dim() != 1 or query_offset.numel() != n_queries or query_offset.is_floating_point() \
            or query_offset.dtype == torch.bool or query_offset.is_complex():
        raise ValueError(
            f"query_offset as a tensor gives each query row's position: it must be 1-D integer with "
            f"{n_queries} entries, got {query_offset.dtype} of shape {tuple(query_offset.shape)}."
        )
    if n_queries == 0:
        return
    lo, hi = torch.aminmax(query_offset)
    # non-negative always (as an int offset); below the key count when causal (a row past the
    # last key would see keys that are not there)
    top = n_keys if causal else None

    def refuse() -> None:
        low, high = int(lo), int(hi)
        if low < 0 or (top is not None and high >= top):
            span = f"[0, {top})" if top is not None else ">= 0"
            raise ValueError(f"query positions must lie in {span}{' for causal attention' if causal else ''}, "
                             f"got positions from {low} to {high}.")

    defer_check(lambda: (lo >= 0) & (hi < top) if top is not None else lo >= 0, refuse)


def allowed_keys(
    n_queries: int,
    n_keys: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    query_offset: int | Tensor = 0,
    device: torch.device | None = None,
) -> Tensor | None:
    """Boolean ``[..., Nq, Nk]`` mask of the keys each query may attend to (None = all).

    ``query_offset``: the global position of the first query row, or a 1-D integer tensor of
    every row's position (:func:`query_positions`). Raises if any query row is left with no key
    at all, since its weights would be 0/0.
    """
    _check_query_offset(query_offset, n_queries, n_keys, causal=causal)
    allowed = None
    if causal:
        rows = query_positions(query_offset, n_queries, device)[:, None]
        allowed = torch.arange(n_keys, device=device)[None, :] <= rows
    if key_padding_mask is not None:
        check_padding_mask(key_padding_mask, n_keys, causal=causal, query_offset=query_offset, n_queries=n_queries)
        pad = key_padding_mask[..., None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def check_mask_leading_dims(key_padding_mask: Tensor | None, *tensors: Tensor) -> None:
    """Refuse a mask whose leading dims do not line up with the tensors it masks.

    Leading dims align from the right, so a ``[B, N]`` mask against ``[B, H, N, d]`` tensors
    would pair B with H (an error when B != H, a silently wrong mask when B == H), and a
    mask with more leading dims than the inputs, or a larger size where they have 1, would
    silently add a batch dim to the output.
    """
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor):
        raise ValueError(f"key_padding_mask must be a bool tensor [..., N], got {type(key_padding_mask).__name__}.")
    if key_padding_mask.dim() == 0:
        raise ValueError("key_padding_mask is a 0-d tensor; pass one bool per key, shape [..., N].")
    lead = max(t.dim() - 2 for t in tensors)
    mask_lead = key_padding_mask.dim() - 1
    if mask_lead > lead:
        raise ValueError(
            f"key_padding_mask {tuple(key_padding_mask.shape)} has more leading dims ({mask_lead}) than the "
            f"inputs ({lead}, shapes {', '.join(str(tuple(t.shape)) for t in tensors)}); it would add a batch "
            "dim to the output. Give one mask row per sequence of the inputs (e.g. [N] for unbatched inputs)."
        )
    if key_padding_mask.dim() >= 2 and mask_lead < lead:
        raise ValueError(
            f"key_padding_mask {tuple(key_padding_mask.shape)} has fewer leading dims than the inputs "
            f"({lead}); leading dims align from the right, so insert the missing ones, e.g. "
            "mask[:, None, :] for inputs [B, H, N, d]."
        )
    inputs = torch.broadcast_shapes(*(t.shape[:-2] for t in tensors))
    try:
        joint = torch.broadcast_shapes(inputs, key_padding_mask.shape[:-1])
    except RuntimeError:
        joint = None
    if joint != inputs:
        raise ValueError(
            f"key_padding_mask leading dims {tuple(key_padding_mask.shape[:-1])} do not match the inputs' "
            f"{tuple(inputs)}; give each its size or 1 (mask [..., N] with the inputs' batch/head dims)."
        )


def check_padding_mask(
    key_padding_mask: Tensor, n_keys: int, *, causal: bool, query_offset: int | Tensor = 0,
    n_queries: int | None = None
) -> None:
    """O(N) check that the mask is well formed and leaves every query row some key."""
    if not isinstance(key_padding_mask, Tensor):
        raise ValueError(f"key_padding_mask must be a bool tensor [..., N], got {type(key_padding_mask).__name__}.")
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(
            f"key_padding_mask must be bool (True = real token, False = padding), got {key_padding_mask.dtype}."
        )
    if key_padding_mask.dim() == 0:
        raise ValueError("key_padding_mask is a 0-d tensor; pass one bool per key, shape [..., N].")
    if key_padding_mask.shape[-1] != n_keys:
        raise ValueError(
            f"key_padding_mask has {key_padding_mask.shape[-1]} entries per row but there are {n_keys} keys."
        )
    if causal:
        # a row at global position i sees keys 0..i: empty iff no real key up to i
        seen = key_padding_mask.cumsum(-1) > 0
        if isinstance(query_offset, Tensor) and query_offset.dim() > 0:
            # clamped: a position out of range is refused by allowed_keys' own check, never read
            positions = query_positions(query_offset, n_keys, seen.device)
            empty = ~seen.index_select(-1, positions.clamp(0, n_keys - 1))
        else:
            start = operator.index(query_offset)
            n_queries = n_keys - start if n_queries is None else n_queries
            empty = ~seen[..., start : start + n_queries]
    else:
        empty = ~key_padding_mask.any(-1, keepdim=True)
    defer_check(lambda: ~empty.any(), lambda: _refuse_empty_rows(empty))


def _refuse_empty_rows(empty: Tensor) -> None:
    if empty.any():
        raise ValueError(
            f"key_padding_mask leaves {int(empty.sum())} query row(s) with no key to attend to "
            "(a fully padded sequence, or left padding with causal=True). Drop those sequences "
            "or unmask at least one key per row."
        )


def normalizers_flag(den: Tensor, *, allow_signed: bool) -> Tensor:
    """0-d bool: every normaliser finite, and > 0 unless ``allow_signed`` (NaN fails both)."""
    lo, hi = torch.aminmax(den.detach())
    if allow_signed:
        return torch.isfinite(lo) & torch.isfinite(hi)
    return (lo > 0) & (hi < math.inf)


def _normalizers_ok(allow_signed: bool) -> Callable[[float, float], bool]:
    if allow_signed:
        return lambda lo, hi: math.isfinite(lo) and math.isfinite(hi)
    return lambda lo, hi: lo > 0 and hi < math.inf  # NaN fails both comparisons


def check_normalizers(den: Tensor, *, allow_signed: bool, valid_rows: Tensor | None = None) -> None:
    """Refuse zero, negative or overflowed HLA/linear-attention normalizers.

    ``den`` holds sum_l prod_m s_il for every query row; ``valid_rows`` (bool, broadcastable)
    marks rows whose result is used. Deferred to the active :class:`CheckBatch` if any.
    """
    batch, skip = _active_or_none()
    if skip:
        return
    if batch is not None and valid_rows is None and den.numel() and den.is_floating_point():
        batch.add_values(torch.aminmax(den.detach()), _normalizers_ok(allow_signed),
                         lambda: _diagnose_normalizers(den, allow_signed=allow_signed))
        return
    if valid_rows is None and den.numel() and den.is_floating_point():
        if bool(normalizers_flag(den, allow_signed=allow_signed)):  # one device sync
            return
    _diagnose_normalizers(den, allow_signed=allow_signed, valid_rows=valid_rows)


def require_flags(flags: Tensor, diagnose: Callable[[], None]) -> None:
    """Per-row pass/fail ``flags`` (1 = fine, 0 = a problem) that a kernel wrote: one ``amin``.

    Read with the active batch's one host sync (or here, without a batch); ``diagnose`` runs
    only when some flag is 0 and raises the detailed error.
    """
    batch, skip = _active_or_none()
    if skip or not flags.numel():
        return
    lo = flags.detach().amin()
    if batch is None:
        if not lo.item() > 0.5:
            diagnose()
        return
    batch.add_values((lo,), lambda x: x > 0.5, diagnose)


def _diagnose_normalizers(den: Tensor, *, allow_signed: bool, valid_rows: Tensor | None = None) -> None:
    nonfinite = ~torch.isfinite(den)
    if valid_rows is not None:
        nonfinite = nonfinite & valid_rows
    if nonfinite.any():
        raise ValueError(
            f"{int(nonfinite.sum())} of {den.numel()} row normalizer(s) overflowed to Inf/NaN: the "
            "feature products are too large for this dtype. Rescale q/k, use float64, or a stabilised "
            "feature map (phi=exp subtracts its maximum)."
        )
    if allow_signed:
        return
    bad = den <= 0
    if valid_rows is not None:
        bad = bad & valid_rows
    if bad.any():
        zero = int((den == 0).sum()) if valid_rows is None else int(((den == 0) & valid_rows).sum())
        raise ValueError(
            f"{int(bad.sum())} of {den.numel()} row(s) have a zero or negative normalizer "
            f"sum_l prod_m s_il <= 0 ({zero} exactly zero). Negative: the factor similarities are "
            "sign-indefinite (identity features, odd M with affine factors). Zero: a row's "
            "similarities all vanish or underflow (relu of an all-negative query, exp of very "
            "negative logits). Use a strictly positive feature map (elu1, favor, or affine with an "
            "even number of tied factors), rescale q/k or use float64, or pass allow_signed=True "
            "to get the signed result."
        )


def check_output(out: Tensor, den: Tensor | None = None, *, allow_signed: bool = False, what: str = "output") -> None:
    """Refuse NaN/Inf in a result computed from finite inputs (e.g. |v| near the dtype's max).

    With ``allow_signed`` a zero normaliser ``den`` (``[..., R, 1]``) may leave Inf/NaN in
    its row: that is the documented signed result, not an overflow.
    """
    batch, skip = _active_or_none()
    if skip:
        return
    if batch is None:
        _diagnose_output(out, den, allow_signed=allow_signed, what=what)
    else:
        batch.add_values((sum_value(out),), math.isfinite,
                         lambda: _diagnose_output(out, den, allow_signed=allow_signed, what=what))


def check_narrowed(before: Tensor, after: Tensor) -> None:
    """Refuse values that were finite in the compute dtype and overflow in the output dtype.

    The fused kernels run fp16 inputs in bf16 (fp32 under the interpreter) and check that
    result; casting it back can still overflow (65504 rounds to 65536 in bf16, Inf in fp16).
    """
    batch, skip = _active_or_none()
    if skip:
        return

    def diagnose():
        lost = torch.isfinite(before.detach()) & ~torch.isfinite(after.detach())
        if lost.any():
            raise ValueError(
                f"{int(lost.sum())} of {after.numel()} output value(s) overflowed to Inf when cast to {after.dtype}, "
                f"although they are finite in {before.dtype}: rescale v (or q/k), or pass float32 inputs."
            )

    if batch is None:
        diagnose()
    else:
        lost = (torch.isfinite(before.detach()) & ~torch.isfinite(after.detach())).sum()
        batch.add_values((lost,), lambda count: count == 0, diagnose)


def _diagnose_output(out: Tensor, den: Tensor | None, *, allow_signed: bool, what: str) -> None:
    bad = ~torch.isfinite(out.detach())
    if allow_signed and den is not None:
        bad = bad & (den.detach() != 0)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {out.numel()} {what} value(s) overflowed to Inf/NaN although every "
            f"input is finite: the weighted sums exceed the range of {out.dtype}. Rescale v (or q/k), "
            "or compute in float64."
        )


def check_nonnegative_weights(weights: Tensor, *, allow_signed: bool) -> None:
    """Refuse negative weights in a materialised map (a positive normaliser does not exclude them).

    ``weights`` are the unnormalised ``[..., Nq, Nk]`` weights, masked entries zero.
    """
    if allow_signed or not weights.numel():
        return
    batch, skip = _active_or_none()
    if skip:
        return
    if batch is None:
        _diagnose_negative_weights(weights)
    else:
        batch.add_values((weights.detach().amin(),), lambda lo: lo >= 0, lambda: _diagnose_negative_weights(weights))


def _diagnose_negative_weights(weights: Tensor) -> None:
    negative = weights.detach() < 0
    if negative.any():
        rows = negative.any(-1)
        raise ValueError(
            f"{int(rows.sum())} of {rows.numel()} row(s) have negative weights ({int(negative.sum())} "
            "entries), so the map is not a distribution even where the row normalizer is positive. The "
            "factor similarities are sign-indefinite (identity features, an odd number of affine "
            "factors, logits below -c). Use a positive feature map or an even number of tied factors, "
            "or pass allow_signed=True to get the signed map."
        )


def nonnegative_weights_flag(qs: Sequence[Tensor], ks: Sequence[Tensor]) -> Tensor | None:
    """Certificate that every HLA weight ``prod_m qs[m]_i . ks[m]_j`` is >= 0, in O(N r).

    ``None`` when it holds by construction: each sign-indefinite factor pair occurs an even
    number of times (tied factors, the same tensor objects), so their product is a square.
    Otherwise a 0-d bool that is True when every remaining factor has features >= 0 (two
    reductions per factor); False means "may be negative".
    """
    flags = [(fq.detach().amin() >= 0) & (fk.detach().amin() >= 0) for fq, fk in _odd_pairs(qs, ks)]
    if not flags:
        return None
    return torch.stack(flags).all()


def _odd_pairs(qs: Sequence[Tensor], ks: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Factor pairs occurring an odd number of times (by identity): only those can make a
    weight negative, since a pair occurring twice multiplies to a square."""
    counts: dict[tuple[int, int], int] = {}
    pairs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    for fq, fk in zip(qs, ks):
        key = (id(fq), id(fk))
        counts[key] = counts.get(key, 0) + 1
        pairs[key] = (fq, fk)
    return [pairs[key] for key, count in counts.items() if count % 2]


def nonnegative_by_construction():
    """The caller vouches that every weight is >= 0 whatever the features' signs.

    For variants whose kernel is positive by construction from sign-indefinite features:
    Taylor's ``1 + s + s^2/2`` and ReBased's ``(q~.k~)^2`` have feature vectors with negative
    entries, so the feature-sign certificate (:func:`check_hla_signs`) would refuse them.
    Inside this block that certificate is skipped; normalisers and outputs are still checked.
    """
    return _thread_flag("certified", True, default=False)


def signs_certified() -> bool:
    """Whether a :func:`nonnegative_by_construction` block is active in this thread."""
    return getattr(_state, "certified", False)


def check_hla_signs(qs: Sequence[Tensor], ks: Sequence[Tensor], *, allow_signed: bool) -> None:
    """Refuse factors whose weights may be negative unless ``allow_signed`` (O(N) forms).

    In a batch: one ``amin`` per feature tensor of an odd pair, read with the batch's sync.
    """
    if allow_signed or signs_certified():
        return
    batch, skip = _active_or_none()
    if skip:
        return
    odd = _odd_pairs(qs, ks)
    if not odd:
        return

    def refuse():
        _diagnose_signs(qs, ks)

    if batch is None:
        refuse()
        return
    mins = [t.detach().amin() for pair in odd for t in pair]
    batch.add_values(mins, lambda *lo: all(x >= 0 for x in lo), refuse)


def _diagnose_signs(qs: Sequence[Tensor], ks: Sequence[Tensor]) -> None:
    flag = nonnegative_weights_flag(qs, ks)
    if flag is not None and not bool(flag):
        raise ValueError(
            "these factor features can give negative attention weights (sign-indefinite factors "
            "that do not pair up into squares: identity or phi=affine features with odd m, or "
            "untied factors), and the "
            "O(N) form cannot check each weight without building the N x N map. Use a positive "
            "feature map or an even number of tied factors, check the map with "
            "hla_attention_map / Variant.attention_map, or pass allow_signed=True to accept "
            "signed weights."
        )


def diagnose_rows(den: Tensor, out: Tensor, qs: Sequence[Tensor], ks: Sequence[Tensor], *,
                  allow_signed: bool, signs: bool) -> None:
    """The detailed diagnosis behind a kernel's failed row flags (:func:`require_flags`).

    In the order of the slow checks: normalisers (NaN/Inf, then zero or negative), the
    output (overflow from finite inputs), then, with ``signs``, the factor features' signs.
    """
    _diagnose_normalizers(den, allow_signed=allow_signed)
    _diagnose_output(out, den[..., None], allow_signed=allow_signed, what="output")
    if signs and not allow_signed:
        _diagnose_signs(qs, ks)
