"""Where the GPU time of `compare` goes at SmolLM2's shape (issue 12): fits and scoring.

Random q, k, v shaped like one SmolLM2 layer (9 heads, N = 8,192, d = 64, causal), the
default variants, the fit settings of `compare`. Prints, and writes as JSON:

- one whole layer through ``compare._layer_rows`` (fits, then scoring of the stacked inputs),
  after a small warm-up layer, with the peak GPU memory;
- each learnable variant's fit time (synchronised);
- the scoring pass of the stacked inputs at two ``block_rows``, and a torch profile of one
  input's scoring (top CUDA kernels and CPU ops).

    python benchmarks/gpu/profile_compare.py --out profile_compare.json
    python benchmarks/gpu/profile_compare.py --smoke --out /tmp/p.json     # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hla_analysis import compare
from hla_analysis.fit import FitConfig, fit_variant, is_learnable
from hla_analysis.variants import list_variants, make_variant


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _batch(inputs, heads, n, d, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(inputs, heads, n, d, generator=g) for _ in range(3))
    return {"q": q.to(device), "k": (k * 1.5).to(device), "v": v.to(device), "scale": d ** -0.5, "causal": True}


def _table(prof, sort, rows=25):
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_compare import SyntheticCapture

    device = torch.device("cpu" if args.smoke else "cuda")
    heads, n, d, inputs = (3, 64, 16, 4) if args.smoke else (9, 8192, 64, 8)
    fit = FitConfig(steps=2) if args.smoke else FitConfig()
    specs = list_variants()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": dict(heads=heads, n=n, d=d, inputs=inputs, causal=True),
              "fits": {}}
    config = compare.CompareConfig(variants=tuple(specs), train_inputs=2, fit=fit)
    # warm-up: kernels, cuBLAS handles, torch.compile of the fused metrics
    small = SyntheticCapture(tokens=min(n, 512), heads=heads, head_dim=d, inputs=3, causal=True)
    seconds, _ = _timed(lambda: compare._layer_rows(small, 0, config, progress=False, device=device), device)
    result["warmup_layer_s"] = round(seconds, 2)
    print(f"warm-up layer (3 x {min(n, 512)} tokens): {seconds:.1f} s", flush=True)
    cap = SyntheticCapture(tokens=n, heads=heads, head_dim=d, inputs=inputs, causal=True, seed=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, _ = _timed(lambda: compare._layer_rows(cap, 0, config, progress=True, device=device), device)
    result["layer_s"] = round(seconds, 2)
    if device.type == "cuda":
        result["layer_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"one layer, {inputs} x {n} tokens, {heads} heads, fits + scoring: {seconds:.1f} s", flush=True)
    train = [compare._to_device(b, device) for _, b in compare._stacks(cap, 0, [0, 1], 2)]
    variants = {}
    for spec in specs:
        variant = make_variant(spec).bind(d, heads=heads).to(device)
        if is_learnable(variant):
            seconds, _ = _timed(lambda v=variant, t=train: fit_variant(v, t, config=fit), device)
            result["fits"][spec] = round(seconds, 3)
            print(f"fit {spec}: {seconds:.2f} s", flush=True)
        variants[spec] = variant
    result["fits_total_s"] = round(sum(result["fits"].values()), 2)
    del train
    (chunk, batch), = compare._stacks(cap, 0, list(range(inputs)), inputs)
    batch = compare._to_device(batch, device)
    kw = dict(topk=5, rank_stride=4, row_stride=1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for block in (256, 1024):
            seconds, _ = _timed(lambda: compare._evaluate(variants, batch, block_rows=block, **kw), device)
            result[f"score_{inputs}_inputs_block{block}_s"] = round(seconds, 3)
            print(f"score all variants, {inputs} inputs stacked, block_rows={block}: {seconds:.2f} s", flush=True)
        one = {**batch, **{name: batch[name][:1] for name in ("q", "k", "v")}}
        with profile(activities=acts) as prof:
            compare._evaluate(variants, one, block_rows=256, **kw)
            _sync(device)
    print("===== scoring one input, all variants, by device time")
    print(_table(prof, "cuda_time_total" if device.type == "cuda" else "cpu_time_total", 40))
    print("===== same, by self CPU time")
    print(_table(prof, "self_cpu_time_total", 30))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
