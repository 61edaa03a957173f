"""The raw numbers the single-head figures show, computed once by ``compare`` as tables.

The results table holds per-head metrics; the attention-map and monotonicity figures need
the weights of one head itself. :func:`write_figure_tables` evaluates them on the capture
while ``compare`` has it open and writes two tidy tables beside the results, so that
:mod:`hla_analysis.report` reads tables only:

``<results>.figure_maps``
    ``variant, layer, head, input, query, key, weight``: the first ``MAP_TOKENS`` queries
    and keys of the head, rows normalised over every key.
``<results>.figure_monotonicity``
    ``variant, layer, head, input, score, weight_times_row_len``: every (query, key) pair
    of the first ``MONOTONICITY_TOKENS`` queries, the logit against the weight scaled by the
    row's length (so rows of different lengths share one axis).

The head is the one HLA with M = 2 fits worst on held-out inputs (layer 0, head 0 without
that variant), on the first held-out input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hla_analysis._io import atomic_write_table
from hla_analysis.variants import make_variant

MAP_VARIANTS = ("softmax", "linear:phi=elu1", "hla:m=2,phi=affine", "hla:m=3,phi=affine", "hla:m=4,phi=affine")
MAP_TOKENS = 48
MONOTONICITY_TOKENS = 256
_TARGET = "hla:m=2,phi=affine"


def figure_table_paths(results_path: str | Path) -> dict[str, Path]:
    """Where the figure tables of a results file live (same folder, same format)."""
    path = Path(results_path)
    return {name: path.with_name(f"{path.stem}.figure_{name}{path.suffix}") for name in ("maps", "monotonicity")}


def figure_head(results: pd.DataFrame) -> dict:
    """``layer, head, input`` the single-head figures show: HLA M=2's worst held-out head."""
    held = results[(results["split"] == "heldout") & (results["metric"] == "kl_mean")]
    target = held[held["variant"] == _TARGET].groupby(["layer", "head"], as_index=False)["value"].mean()
    layer, head = 0, 0
    if not target.empty:
        worst = target.loc[target["value"].idxmax()]
        layer, head = int(worst["layer"]), int(worst["head"])
    inputs = sorted(results.loc[results["split"] == "heldout", "input"].unique())
    return {"layer": layer, "head": head, "input": int(inputs[0]) if inputs else 0}


def _head_data(capture, layer: int, head: int, input_index: int, tokens: int):
    """The first ``tokens`` queries of one head with ALL keys, so every row is the real row."""
    d = capture.get(layer, input_index)
    n = min(tokens, d["q"].shape[-2])
    # float32 whatever the capture stores: float16/bfloat16 maps are for plotting, and numpy has no bfloat16
    return d["q"][head, :n].float(), d["k"][head].float(), d["scale"], d["causal"]


def _maps(q, k, scale, causal) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {spec: make_variant(spec).attention_map(q, k, scale=scale, causal=causal, allow_signed=True).numpy()
                for spec in MAP_VARIANTS}


def _map_table(maps: dict[str, np.ndarray], tokens: int) -> pd.DataFrame:
    """Every variant's top-left ``tokens x tokens`` block (rows are normalised over every key)."""
    rows = []
    for spec, attn in maps.items():
        n = min(tokens, attn.shape[0])
        block = attn[:n, :n]
        i, j = np.meshgrid(range(n), range(n), indexing="ij")
        rows.append(pd.DataFrame({"variant": spec, "query": i.ravel(), "key": j.ravel(), "weight": block.ravel()}))
    return pd.concat(rows, ignore_index=True)


def _monotonicity_table(maps: dict[str, np.ndarray], scores: np.ndarray, causal: bool) -> pd.DataFrame:
    """Weight (times the row's allowed length) against the logit, for every allowed pair."""
    keep = np.tril(np.ones_like(scores, dtype=bool)) if causal else np.ones_like(scores, dtype=bool)
    row_len = keep.sum(-1, keepdims=True)
    frames = [pd.DataFrame({"variant": spec, "score": scores[keep], "weight_times_row_len": (attn * row_len)[keep]})
              for spec, attn in maps.items()]
    return pd.concat(frames, ignore_index=True)


def write_figure_tables(capture, results: pd.DataFrame, results_path: str | Path) -> dict[str, Path]:
    """Compute both figure tables for :func:`figure_head` and write them beside the results.

    The head is read once and each variant's map computed once, on the first
    ``MONOTONICITY_TOKENS`` queries; the map table is its top-left ``MAP_TOKENS`` block.
    """
    where = figure_head(results)
    layer, head, input_index = where["layer"], where["head"], where["input"]
    q, k, scale, causal = _head_data(capture, layer, head, input_index, max(MAP_TOKENS, MONOTONICITY_TOKENS))
    maps = _maps(q, k, scale, causal)
    scores = (q @ k.T * scale).numpy()
    paths = figure_table_paths(results_path)
    atomic_write_table(paths["maps"], _map_table(maps, MAP_TOKENS)
                       .assign(layer=layer, head=head, input=input_index, keys=k.shape[0]))
    atomic_write_table(paths["monotonicity"], _monotonicity_table(maps, scores, causal)
                       .assign(layer=layer, head=head, input=input_index))
    return paths


def load_figure_tables(results_path: str | Path) -> dict[str, pd.DataFrame]:
    """Read the figure tables that ``compare`` wrote beside ``results_path``."""
    out = {}
    for name, path in figure_table_paths(results_path).items():
        if not path.is_file():
            raise FileNotFoundError(f"no figure table at {path}; rerun `hla-analysis compare` to write it.")
        out[name] = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return out
