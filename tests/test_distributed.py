"""Sequence-parallel HLA on 2 and 3 CPU ranks (gloo) against single-process hla().

Spawning ranks costs seconds, so each test spawns once and runs a list of cases in it. Each
rank draws the whole problem from one seed, runs its (uneven) shard through
hla_sequence_parallel and compares its output rows and its inputs' gradients with hla() on
the whole sequence. The torch cases run in float64: the two computations sum the same terms
in different orders, so they agree to a few hundred float64 eps of the magnitudes involved.
The Triton cases (fp32, the CPU interpreter) allow 1e-5, as tests/test_triton_hla.py does.
"""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hla_analysis.distributed import hla_sequence_parallel
from hla_analysis.ops import hla

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(m, n, widths, dv, *, seed, dtype, lead=(2,)):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.rand(*lead, n, widths[i], generator=g) + 0.05).to(dtype) for i in range(m)]
    ks = [(torch.rand(*lead, n, widths[i], generator=g) + 0.05).to(dtype) for i in range(m)]
    v = torch.randn(*lead, n, dv, generator=g).to(dtype)
    grad_out = torch.randn(*lead, n, dv, generator=g).to(dtype)
    return qs, ks, v, grad_out


def _run_case(rank, sizes, *, m, causal, mask, backend, dtype, widths, dv, seed, tol):
    n = sum(sizes)
    lo = sum(sizes[:rank])
    shard = slice(lo, lo + sizes[rank])
    qs, ks, v, grad_out = _problem(m, n, widths, dv, seed=seed, dtype=dtype)
    kpm = None
    if mask:
        kpm = torch.rand(1, n, generator=torch.Generator().manual_seed(seed + 1)) > 0.4
        kpm[..., 0] = True  # every causal row keeps a key
        kpm[..., sizes[0]: sizes[0] + sizes[1]] = False  # rank 1 holds padding only
    full = [t.clone().requires_grad_() for t in (*qs, *ks, v)]
    ref = hla(full[:m], full[m:2 * m], full[-1], causal=causal, key_padding_mask=kpm, backend="torch")
    ref_grads = torch.autograd.grad(ref, full, grad_out)

    local = [t[..., shard, :].clone().requires_grad_() for t in (*qs, *ks, v)]
    out = hla_sequence_parallel(local[:m], local[m:2 * m], local[-1], causal=causal, backend=backend,
                                key_padding_mask=None if kpm is None else kpm[..., shard])
    grads = torch.autograd.grad(out, local, grad_out[..., shard, :])
    names = ["out"] + [f"dq{i}" for i in range(m)] + [f"dk{i}" for i in range(m)] + ["dv"]
    for name, got, want in zip(names, [out, *grads], [ref, *ref_grads]):
        want = want[..., shard, :].detach()
        err = float((got.detach() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert err < tol, f"rank {rank} {name} (m={m}, causal={causal}, mask={mask}, {backend}): {err:.2e}"
        if kpm is not None and name.startswith("dk"):  # padded keys get exactly zero gradient
            assert float(got.detach()[..., ~kpm[0, shard], :].abs().sum()) == 0.0


def _expect_value_error(fn, *fragments):
    try:
        fn()
    except ValueError as exc:
        for f in fragments:
            assert f in str(exc), f"{f!r} not in {exc}"
        return
    raise AssertionError("no ValueError raised")


def _error_cases(rank, world):
    qs, ks, v, _ = _problem(2, 6 * world, (3, 2), 4, seed=7, dtype=torch.float64)
    sl = slice(6 * rank, 6 * rank + 6)
    q, k, vv = [t[..., sl, :] for t in qs], [t[..., sl, :] for t in ks], v[..., sl, :]
    # one rank's NaN: every rank raises, naming that rank, and none hangs
    bad_v = vv.clone()
    if rank == world - 1:
        bad_v[..., 0, 0] = float("nan")
    _expect_value_error(lambda: hla_sequence_parallel(q, k, bad_v), f"rank {world - 1}", "NaN")
    # shards of different problems (a rank with other widths)
    q2 = [q[0], q[1][..., :1]] if rank == 0 else q
    k2 = [k[0], k[1][..., :1]] if rank == 0 else k
    _expect_value_error(lambda: hla_sequence_parallel(q2, k2, vv), "disagree")
    # a negative normaliser on one rank only: the whole group refuses
    qn = [-q[0] if rank == 0 else q[0], q[1]]
    _expect_value_error(lambda: hla_sequence_parallel(qn, k, vv), "zero or negative normalizer")
    # ... and with allow_signed every rank returns the signed result
    out = hla_sequence_parallel(qn, k, vv, allow_signed=True)
    assert torch.isfinite(out).all()
    # keys all padded: zero normalisers are refused as well
    kpm = torch.zeros(1, 6, dtype=torch.bool)
    _expect_value_error(lambda: hla_sequence_parallel(q, k, vv, key_padding_mask=kpm), "exactly zero")
    # the group still works after all these refusals
    out = hla_sequence_parallel(q, k, vv, causal=True)
    assert out.shape == vv.shape


def _worker(rank, world, port, cases, errors, queue):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        try:
            for case in cases:
                _run_case(rank, **case)
            if errors:
                _error_cases(rank, world)
        finally:
            dist.destroy_process_group()
        queue.put((rank, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, traceback.format_exc()))


def _spawn(world, cases, *, errors=False):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, errors, queue)) for r in range(world)]
    for p in procs:
        p.start()
    reports = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout=60)
    failures = [f"rank {r}:\n{tb}" for r, tb in sorted(reports.items()) if tb]
    assert not failures, "\n".join(failures)


F64 = dict(dtype=torch.float64, backend="torch", tol=1e-11)


@pytest.mark.slow
def test_two_ranks_torch_forms_and_errors():
    cases = [
        dict(sizes=[7, 12], m=2, causal=False, mask=False, widths=(3, 2), dv=4, seed=1, **F64),
        dict(sizes=[7, 12], m=2, causal=True, mask=False, widths=(3, 2), dv=4, seed=2, **F64),
        dict(sizes=[9, 5], m=1, causal=True, mask=True, widths=(4,), dv=3, seed=3, **F64),
        dict(sizes=[9, 5], m=3, causal=False, mask=True, widths=(2, 3, 2), dv=3, seed=4, **F64),
    ]
    _spawn(2, cases, errors=True)


@pytest.mark.slow
def test_three_ranks_uneven_shards():
    cases = [
        dict(sizes=[5, 11, 3], m=2, causal=True, mask=True, widths=(3, 2), dv=4, seed=5, **F64),
        dict(sizes=[5, 11, 3], m=3, causal=True, mask=False, widths=(2, 2, 3), dv=2, seed=6, **F64),
        dict(sizes=[8, 3, 6], m=2, causal=False, mask=False, widths=(3, 3), dv=5, seed=7, **F64),
    ]
    _spawn(3, cases)


@pytest.mark.skipif(not INTERPRET, reason="the Triton kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.slow
def test_triton_kernels_across_ranks():
    pytest.importorskip("triton")
    tri = dict(dtype=torch.float32, backend="triton", tol=2e-5, widths=(16, 16), dv=16)
    cases = [
        dict(sizes=[40, 27], m=2, causal=True, mask=True, seed=8, **tri),
        dict(sizes=[40, 27], m=2, causal=False, mask=False, seed=9, **tri),
        dict(sizes=[33, 50], m=1, causal=True, mask=False, seed=10, **{**tri, "widths": (16,)}),
    ]
    _spawn(2, cases)
