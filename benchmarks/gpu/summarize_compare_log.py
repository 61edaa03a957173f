"""Times of a `bench_compare.py --only smollm2` run read off its progress log (a run cut short
by its slot writes no JSON of its own; its tqdm lines still say how far it got and when).

Reads the capture bar (inputs, elapsed) and the per-layer ``compare`` bar (layers done,
elapsed), and writes one JSON: capture seconds, seconds per finished layer, the steady
per-layer time (median of layers 2..), and the end-to-end time projected to every layer.

    python benchmarks/gpu/summarize_compare_log.py benchmarks/gpu/results/session7/compare_smollm2.log \
        --out benchmarks/gpu/results/session7/compare_smollm2_summary.json

A run split into two calls (``session5_compare.sh capture``, then ``compare``) has two logs: pass
both, the capture's first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hla_analysis._io import atomic_write_json  # noqa: E402

_BAR = re.compile(r"^(?P<name>capture smollm2|compare):\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+) "
                  r"\[(?P<elapsed>[\d:]+)<")


def _seconds(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def summarize(lines) -> dict:
    capture, layers, total_layers = None, {}, None
    for line in lines:
        m = _BAR.match(line.strip())
        if not m:
            continue
        done, elapsed = int(m["done"]), _seconds(m["elapsed"])
        if m["name"] == "capture smollm2" and done == int(m["total"]):
            capture = {"inputs": done, "seconds": elapsed}
        elif m["name"] == "compare" and done > 0:
            layers[done] = elapsed
            total_layers = int(m["total"])
    if capture is None or not layers:
        raise SystemExit("the log has no finished capture bar or no finished layer: nothing to summarize.")
    done = max(layers)
    per_layer = [layers[i] - layers.get(i - 1, 0) for i in sorted(layers)]
    steady = statistics.median(per_layer[1:]) if len(per_layer) > 1 else per_layer[0]
    projected = capture["seconds"] + layers[done] + steady * (total_layers - done)
    return {
        "capture_inputs": capture["inputs"], "capture_s": capture["seconds"],
        "layers_total": total_layers, "layers_done": done, "compare_elapsed_s": layers[done],
        "seconds_per_layer": per_layer, "steady_s_per_layer": steady,
        "projected_end_to_end_s": projected,
        "note": "tqdm's elapsed clock has whole seconds; the projection adds the steady per-layer time "
                "for the layers not reached to the capture and the elapsed compare time (model "
                "conversion and Python start-up are not in either bar)",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="+", help="the run's log, or its capture log then its compare log")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    text = "\n".join(Path(log).read_text(encoding="utf-8", errors="replace") for log in args.log).replace("\r", "\n")
    result = {"log": args.log if len(args.log) > 1 else args.log[0], **summarize(text.splitlines())}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
