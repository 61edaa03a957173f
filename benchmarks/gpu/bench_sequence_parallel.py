"""Benchmark: sequence-parallel HLA (hla_analysis.distributed) over the GPUs of one host.

Launched by torchrun, one process per GPU (NCCL; gloo and tiny sizes with ``--smoke``)::

    torchrun --nproc_per_node 1 benchmarks/gpu/bench_sequence_parallel.py --out sp_1gpu.json
    torchrun --nproc_per_node 4 benchmarks/gpu/bench_sequence_parallel.py --out sp_4gpu.json
    torchrun --nproc_per_node 2 benchmarks/gpu/bench_sequence_parallel.py --smoke --out /tmp/sp.json  # CPU

Cases (B = 1, H = 12, M = 2, r = 64 per factor, dv = 128, bf16, positive features):
weak scaling, 75,600 tokens per rank; strong scaling, 302,400 tokens in all (split evenly);
causal and not; forward and forward+backward. Per case, rank 0 writes one row with the median
(CUDA events, after warm-up) of the whole step (``step_ms``, the slowest rank's median), of the
same step on a one-rank group (``local_ms``: the same kernels, no communication) and of the
step's collectives alone at the step's message sizes (``collective_ms``). Weak-scaling
efficiency is ``step_ms`` on one GPU over ``step_ms`` on P GPUs at the same tokens per GPU:
compare the JSON files of runs with different ``--nproc_per_node``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from hla_analysis.distributed import hla_sequence_parallel  # noqa: E402

WEAK_TOKENS, STRONG_TOKENS = 75_600, 302_400


def timed(fn, *, cuda: bool, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU), after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def inputs(n, *, heads, r, dv, device, dtype, grad):
    def pos(*shape):
        return (torch.rand(*shape, device=device) * 0.5 + 0.05).to(dtype).requires_grad_(grad)

    qs, ks = [pos(1, heads, n, r) for _ in range(2)], [pos(1, heads, n, r) for _ in range(2)]
    v = torch.randn(1, heads, n, dv, device=device).to(dtype).requires_grad_(grad)
    return qs, ks, v


def step(qs, ks, v, *, causal, backward, group, backend):
    out = hla_sequence_parallel(qs, ks, v, causal=causal, group=group, backend=backend)
    if backward:
        out.backward(torch.ones_like(out))


def collectives(state_numel, *, causal, backward, group, device):
    """The step's collectives alone: fp32 state, all_reduce (non-causal) or all_gather (causal)."""
    world = dist.get_world_size(group)
    x = torch.ones(state_numel, device=device)
    out = torch.empty(world * state_numel, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def run():
        for _ in range(2 if backward else 1):
            if causal:
                gather(out, x, group=group)
            else:
                dist.all_reduce(x, group=group)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file written by rank 0")
    ap.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny sizes, torch forms")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()

    cuda = torch.cuda.is_available() and not args.smoke
    if "RANK" not in os.environ:  # plain `python`: a one-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # one singleton group per rank, for the communication-free reference time
    singles = [dist.new_group([r]) for r in range(world)]
    alone = singles[rank]

    if args.smoke:
        heads, r, dv, dtype, backend = 2, 16, 16, torch.float32, "torch"
        weak, strong = 256, 768
    else:
        heads, r, dv, dtype, backend = 12, 64, 128, torch.bfloat16, "auto"
        weak, strong = WEAK_TOKENS, STRONG_TOKENS
    scalings = [("weak", weak)] + ([("strong", strong // world)] if world > 1 or args.smoke else [])
    state_numel = heads * (r * r * dv + r * r)
    rows = []
    for scaling, n_local in scalings:
        for causal in (False, True):
            for backward in (False, True):
                qs, ks, v = inputs(n_local, heads=heads, r=r, dv=dv, device=device, dtype=dtype, grad=backward)
                kw = dict(causal=causal, backward=backward, backend=backend)
                step_ms = timed(lambda qs=qs, ks=ks, v=v: step(qs, ks, v, group=None, **kw), cuda=cuda,
                                warmup=args.warmup, reps=args.reps)
                local_ms = timed(lambda qs=qs, ks=ks, v=v: step(qs, ks, v, group=alone, **kw), cuda=cuda,
                                 warmup=args.warmup, reps=args.reps)
                coll_ms = timed(collectives(state_numel, causal=causal, backward=backward, group=None,
                                            device=device), cuda=cuda, warmup=args.warmup, reps=args.reps)
                times = torch.tensor([step_ms, local_ms, coll_ms], device=device)
                dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                step_ms, local_ms, coll_ms = times.tolist()
                rows.append(dict(
                    scaling=scaling, world_size=world, tokens_per_rank=n_local, tokens_total=n_local * world,
                    causal=causal, pass_="fwd+bwd" if backward else "fwd", heads=heads, r=r, dv=dv,
                    dtype=str(dtype).removeprefix("torch."), backend=backend, step_ms=step_ms,
                    local_ms=local_ms, collective_ms=coll_ms, collective_share=coll_ms / step_ms,
                    device=torch.cuda.get_device_name(device) if cuda else "cpu",
                    warmup=args.warmup, reps=args.reps,
                ))
                if rank == 0:
                    print(json.dumps(rows[-1]), flush=True)
                del qs, ks, v
    if rank == 0:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
