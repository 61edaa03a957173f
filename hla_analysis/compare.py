"""Compare attention variants with softmax on a capture: one tidy table.

For every layer, head, input and variant the runner streams over blocks of query rows,
computes the variant's weights next to softmax's, and reduces them with
:mod:`hla_analysis.metrics`. Learnable variants are first fitted per head on the training
inputs (:mod:`hla_analysis.fit`) and then evaluated on every input; each row of the table
says whether its input was ``train`` or ``heldout``, and rankings use held-out rows only.

Output: a long table with columns ``input, layer, head, variant, split, metric, value`` plus
the settings that produced it. Layers are written as they finish (atomically) into
``<out>.parts/``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from hla_analysis import __version__
from hla_analysis._checks import check_batch
from hla_analysis._io import atomic_write_json, atomic_write_table, exclusive_output_lock, refuse_foreign_outputs
from hla_analysis.capture import load_capture
from hla_analysis.fit import FitConfig, fit_variant, is_learnable
from hla_analysis.metrics.streaming import StreamingAttentionMetrics, reference_rows
from hla_analysis.swap.fits import fit_key, load_fits, save_fits
from hla_analysis.variants import list_variants, make_variant

METRICS = (
    "kl_mean",
    "kl_max",
    "js_mean",
    "tv_mean",
    "frobenius_rel",
    "output_rel",
    "entropy_ref_mean",
    "entropy_approx_mean",
    "topk_recall_mean",
    "spearman_mean",
    "failed_fraction",
    "kl_floored_rows",
)
COLUMNS = ["input", "layer", "head", "variant", "split", "metric", "value"]


@dataclass(frozen=True)
class CompareConfig:
    """What a comparison run does; stored beside the results and checked on resume."""

    variants: tuple[str, ...]
    train_inputs: int
    fit: FitConfig = FitConfig()
    block_rows: int = 256
    topk: int = 5
    rank_stride: int = 4
    row_stride: int = 1

    def key(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_dict(self) -> dict:
        return {
            "variants": list(self.variants),
            "train_inputs": self.train_inputs,
            "fit": self.fit.as_dict(),
            "block_rows": self.block_rows,
            "topk": self.topk,
            "rank_stride": self.rank_stride,
            "row_stride": self.row_stride,
        }


def resolve_variants(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"default"``, a comma-free list, or ``"a;b"``-style strings -> canonical specs.

    Specs themselves contain commas (``hla:m=2,phi=affine``), so on the command line several
    are separated by spaces or semicolons; ``default`` expands to the registry's default set.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(";"))):
            out.extend(list_variants() if part == "default" else [make_variant(part).spec])
    if not out:
        raise ValueError("no variants given: pass specs like 'softmax;hla:m=2,phi=affine' or 'default'.")
    return tuple(dict.fromkeys(out))


def _evaluate(
    variants: dict, batch: dict, *, block_rows: int, topk: int, rank_stride: int, row_stride: int = 1,
    progress=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Metrics of every variant on a stack of inputs ``[I, H, N, d]``: ``{spec: {metric: [I, H]}}``.

    One pass over blocks of query rows: the logits, the softmax reference and the row masks
    of a block are computed once and every variant is scored against them, so only
    ``[I, H, block_rows, N]`` maps are alive. With ``row_stride > 1`` the metrics read every
    ``row_stride``-th row only (their cost dominates): an unbiased sample of the rows.
    """
    q, k, v = batch["q"], batch["k"], batch["v"]
    n = q.shape[-2]
    accs = {spec: StreamingAttentionMetrics(k=topk, batch_dims=q.dim() - 2, rank_stride=rank_stride)
            for spec in variants}
    sample = slice(None, None, row_stride)
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        kw = dict(scale=batch["scale"], causal=batch["causal"], query_offset=start)
        q_block = q[..., rows, :]
        p = _REFERENCE.attention_map(q_block, k, **kw)[..., sample, :]
        scores = ((q_block @ k.transpose(-1, -2)) * batch["scale"])[..., sample, :]
        allowed = None
        if batch["causal"]:
            allowed = (torch.arange(n, device=q.device)[None, :]
                       <= torch.arange(start, rows.stop, device=q.device)[:, None])[sample]
        # checked once here (p, scores, v), then shared by every variant
        ref = reference_rows(p, allowed=allowed, v=v, scores=scores, k=topk, rank_stride=rank_stride)
        del scores
        # every variant's NaN/Inf checks of this block in one batch: one reduction per tensor
        # and one host read per block (not per variant), same errors, first failure reported
        with check_batch():
            for spec, variant in variants.items():
                if variant.is_reference:  # its weights are the reference itself
                    accs[spec].update_against(ref, p)
                    continue
                weights, den = variant.weights(q_block, k, **kw)
                den = den.squeeze(-1)[..., sample]
                weights = weights[..., sample, :]
                # A row whose normalizer is <= 0 is a failure even where weights/den looks like a
                # distribution (all-negative numerators over a negative normalizer).
                invalid = ~(den > 0) | ~torch.isfinite(den)
                p_hat = weights.div_(torch.where(invalid, torch.ones_like(den), den)[..., None])
                accs[spec].update_against(ref, p_hat, invalid=invalid)
                del weights, p_hat
        if progress is not None:
            progress(rows.stop - rows.start)
    return {spec: acc.compute() for spec, acc in accs.items()}


_REFERENCE = make_variant("softmax")


def _stacks(cap, layer: int, indices: list[int], size: int) -> list[tuple[list[int], dict]]:
    """Inputs of one layer stacked into ``[I, H, N, d]`` groups of equal length (<= size each)."""
    by_length: dict[int, list[int]] = {}
    for i in indices:
        by_length.setdefault(cap.lengths[i], []).append(i)
    groups = []
    for same in by_length.values():
        for start in range(0, len(same), size):
            chunk = same[start : start + size]
            data = [cap.get(layer, i) for i in chunk]
            for i, d in zip(chunk, data):
                if d.get("attention_mask") is not None:
                    raise ValueError(
                        f"input {i} of layer {layer} has a custom attention mask; the comparison supports "
                        "padding-free causal or bidirectional captures only."
                    )
            batch = {name: torch.stack([d[name] for d in data]) for name in ("q", "k", "v")}
            batch.update(scale=data[0]["scale"], causal=data[0]["causal"])
            groups.append((chunk, batch))
    return groups


def _to_device(batch: dict, device: torch.device) -> dict:
    return {**batch, **{name: batch[name].to(device) for name in ("q", "k", "v")}}


def _layer_rows(cap, layer: int, config: CompareConfig, *, progress: bool,
                device: torch.device = torch.device("cpu")) -> tuple[pd.DataFrame, list[dict], dict]:
    all_inputs = list(range(cap.num_inputs))
    train = [_to_device(batch, device)
             for _, batch in _stacks(cap, layer, all_inputs[: config.train_inputs], config.train_inputs)]
    # stack as many inputs as keep one [I, H, block, N] map near _MAP_ELEMENTS (long inputs: one)
    longest = max(cap.lengths)
    per_input = cap.num_heads * min(config.block_rows, longest) * longest
    stack = max(1, min(_EVAL_STACK, _MAP_ELEMENTS // per_input) if device.type != "cuda"
                else min(_EVAL_STACK_GPU, _gpu_map_elements(device) // per_input))
    heads, dim = cap.num_heads, cap.head_dim
    # fits first (in the order of the variants, as before), then every variant in one pass
    variants, params, fits, states = {}, {}, [], {}
    # one bar per layer: the fits first (named in the postfix), then the query rows scored
    # with rows/s and an ETA (the clock restarts when scoring starts)
    total_rows = sum(cap.lengths)
    bar = tqdm(total=total_rows, desc=f"layer {layer}", unit="row", leave=False, disable=not progress)
    learnable = [spec for spec in config.variants if is_learnable(make_variant(spec))]
    for spec in config.variants:
        variant = make_variant(spec).bind(dim, heads=heads).to(device)
        params[spec] = 0
        if is_learnable(variant):
            bar.set_postfix_str(f"fitting {learnable.index(spec) + 1}/{len(learnable)} {spec}")
            result = fit_variant(variant, train, config=config.fit)
            params[spec] = result.params_per_head
            fits.append({"layer": layer, "variant": spec, "params_per_head": result.params_per_head,
                         "loss_initial": result.initial_loss, "loss_final": result.final_loss,
                         "steps": config.fit.steps})
            prefix = fit_key(layer, spec, config.fit.objective)
            states.update({prefix + name: t.detach().cpu() for name, t in variant.state_dict().items()})
        variants[spec] = variant
    del train
    bar.set_postfix_str(f"scoring {len(variants)} variants")
    bar.reset(total=total_rows)
    rows = []
    with torch.no_grad():
        for chunk, batch in _stacks(cap, layer, all_inputs, stack):
            batch = _to_device(batch, device)
            metrics = _evaluate(
                variants, batch, block_rows=config.block_rows, topk=config.topk,
                rank_stride=config.rank_stride, row_stride=config.row_stride,
                progress=lambda r, i=len(chunk): bar.update(r * i),
            )
            for spec in config.variants:
                # only the per-head sums leave the device, once per stack of inputs
                values = {name: metrics[spec][name].tolist() for name in METRICS}
                for row, i in enumerate(chunk):
                    split = "train" if i < config.train_inputs else "heldout"
                    for name in METRICS:
                        for h, value in enumerate(values[name][row]):
                            rows.append((i, layer, h, spec, split, name, value, params[spec]))
    bar.close()
    table = pd.DataFrame(rows, columns=[*COLUMNS, "params_per_head"])
    sort = {spec: n for n, spec in enumerate(config.variants)}
    table = table.sort_values(["variant", "input"], key=lambda c: c.map(sort) if c.name == "variant" else c,
                              kind="stable").reset_index(drop=True)
    return table, fits, states


# inputs evaluated together (fewer Python round trips), within a memory budget per map block;
_EVAL_STACK = 2  # measured: 2 is as fast as 8 on 2 cores (the maps then stay nearer the caches)
_MAP_ELEMENTS = 2**25  # 128 MB of float32 per [I, H, block_rows, N] map
# On a GPU, stacking inputs is what amortises the ~100 kernel launches per variant and block
# (one input of SmolLM2 at N = 8,192 is a [9, 256, 8192] map: 75 MB, ~25 us per pass).
_EVAL_STACK_GPU = 8
# float32 maps alive at the peak of a block's scoring, counted generously (the reference's
# p, log p, support, scores and ranks; a variant's weights, p_hat and the metric temporaries)
_MAPS_ALIVE = 96


def _gpu_map_elements(device: torch.device) -> int:
    """Elements of one ``[I, H, block_rows, N]`` map that the free device memory allows."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(2**28, free // (4 * _MAPS_ALIVE))


def run_comparison(
    capture_dir: str | Path,
    *,
    out: str | Path,
    variants: str | list[str] = "default",
    train_inputs: int | None = None,
    fit: FitConfig = FitConfig(),
    block_rows: int = 256,
    row_stride: int = 1,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every variant against softmax on a capture and write the tidy results table.

    Parameters
    ----------
    capture_dir : path
        A finished capture (:func:`hla_analysis.capture.capture`).
    out : path
        Results file, ``.parquet`` or ``.csv``. Written atomically at the end; finished
        layers are kept in ``<out>.parts/`` so that a rerun resumes.
    variants : str or list of str
        Specs (see :mod:`hla_analysis.variants`) or ``"default"``.
    train_inputs : int, optional
        Inputs ``0..train_inputs-1`` fit the learnable variants; the rest are held out.
        Default: a quarter of the inputs, at most 4 (at least one, and one held out).
    fit : FitConfig
        The one optimiser setting every fitted variant gets.
    block_rows : int
        Query rows per streamed block; memory grows as ``N x block_rows``.
    row_stride : int
        Evaluate every ``row_stride``-th query row (1 = all): a sample that cuts the cost of
        the metrics by that factor. Recorded in the settings.
    device : str
        Torch device for every heavy step (logits, maps, metrics, fits), e.g. ``"cuda"``.
        Only per-head sums come back to the host; the table does not depend on the device
        beyond float rounding.
    overwrite : bool
        Replace an existing ``out`` (and its ``.fits.csv`` / ``.fits.safetensors`` / ``.settings.json``) that this
        tool did not write. Its own earlier results are replaced without asking.
    progress : bool
        Progress bars: layers, and per layer the query rows scored, with rows/s and an ETA.

    Returns
    -------
    pandas.DataFrame
        ``input, layer, head, variant, split, metric, value, params_per_head`` plus the
        settings columns ``model, fit_steps, fit_lr, fit_seed, fit_max_rows, row_stride``.
    """
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"results file must end in .parquet or .csv, got {out.name!r}.")
    device = _check_device(device)
    _check_outputs(out, overwrite=overwrite)
    cap = load_capture(capture_dir)
    if cap.num_inputs < 2:
        raise ValueError("a comparison needs at least 2 captured inputs (one to fit on, one held out); capture more.")
    if train_inputs is None:
        train_inputs = min(max(1, cap.num_inputs // 4), 4, cap.num_inputs - 1)
    if not 1 <= train_inputs < cap.num_inputs:
        raise ValueError(
            f"train_inputs (--train-inputs) must be between 1 and {cap.num_inputs - 1} (one input at least must be "
            "held out), "
            f"got {train_inputs}."
        )
    if block_rows < 1 or row_stride < 1:
        raise ValueError(f"block_rows (--block-rows) and row_stride (--row-stride) must be >= 1, "
                         f"got {block_rows} and {row_stride}.")
    config = CompareConfig(
        variants=resolve_variants(variants), train_inputs=train_inputs, fit=fit, block_rows=block_rows,
        row_stride=row_stride,
    )
    parts = out.with_name(out.name + ".parts")
    # The lock lives in the parts folder, which belongs to this one output: two runs into
    # different files of one shared folder (the cwd, say) do not block each other, two runs
    # into the same file do.
    _reuse_freed_memory()
    try:
        with exclusive_output_lock(parts, command="compare"):
            return _run_locked(cap, capture_dir, out, parts, config, device=device, progress=progress)
    finally:
        _give_back_memory()


def _reuse_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    A comparison allocates and frees tens of ``[I, H, block_rows, N]`` maps per block. By
    default glibc serves such sizes with fresh pages (mmap, or a heap top it keeps trimming),
    and faulting those in costs more than the arithmetic of an elementwise pass (measured:
    1.8 ms vs 0.3 ms for a 6 MB subtraction). Fixed thresholds make freed blocks reusable; the
    maps alive at the peak are the same, so the peak is not raised. Process-wide, glibc only,
    set once; :func:`_give_back_memory` trims the heap when a run ends. No effect elsewhere.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 2**28)  # blocks up to 256 MB from the reusable heap
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)  # give back only past 1 GB of free heap top
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the defaults
        pass


def _give_back_memory() -> None:
    """Return the heap's free memory to the kernel (glibc ``malloc_trim``); no-op elsewhere."""
    if _MALLOC_TUNED:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _check_device(device) -> torch.device:
    """The device as a ``torch.device``, checked as the capture checks it (one-line errors)."""
    from hla_analysis.capture.run import check_device

    return torch.device(check_device(device))


def _outputs(out: Path) -> list[Path]:
    """Every file a run writes beside ``out``; the settings file (which marks them as ours) is [2]."""
    from hla_analysis.figure_tables import figure_table_paths

    return [out, out.with_name(out.stem + ".fits.csv"), out.with_name(out.stem + ".settings.json"),
            fits_path(out), *figure_table_paths(out).values()]


def fits_path(out: str | Path) -> Path:
    """``<out stem>.fits.safetensors``: the fitted per-head parameters of the learnable variants.

    Keys are ``fit_key(layer, spec, objective) + <state_dict name>``
    (:mod:`hla_analysis.swap.fits`); load with :func:`hla_analysis.swap.fits.load_fits` and
    :func:`hla_analysis.swap.fits.layer_state`.
    """
    out = Path(out)
    return out.with_name(out.stem + ".fits.safetensors")


_TOOL = "hla-analysis compare"


def _check_outputs(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or belong to the user."""
    outputs = _outputs(out)
    refuse_foreign_outputs(out, outputs, settings=outputs[2], tool=_TOOL, overwrite=overwrite)


def capture_identity(capture_dir: str | Path) -> str:
    """SHA-256 of the capture's ``manifest.json``: which capture a result belongs to."""
    from hla_analysis.capture.store import MANIFEST, file_sha256

    return file_sha256(Path(capture_dir) / MANIFEST)


def _run_locked(cap, capture_dir, out: Path, parts: Path, config: CompareConfig, *, device, progress) -> pd.DataFrame:
    settings_path = parts / "settings.json"
    settings = {"tool": _TOOL, **config.as_dict(), "key": config.key(),
                "capture": str(Path(capture_dir).resolve()), "capture_sha256": capture_identity(capture_dir),
                "model": cap.manifest.get("model"), "version": __version__, "device": str(device)}
    if settings_path.exists():
        before = json.loads(settings_path.read_text())
        if before.get("key") != config.key():
            raise ValueError(
                f"{parts} holds partial results of a run with other settings; delete it or choose another --out."
            )
        if before.get("capture_sha256") != settings["capture_sha256"]:
            raise ValueError(
                f"{parts} holds partial results of another capture ({before.get('capture')}); "
                "delete it or choose another --out."
            )
    atomic_write_json(settings_path, {k: v for k, v in settings.items() if k != "device"})

    started = time.perf_counter()
    tables, fits, states = [], [], {}
    for layer in tqdm(range(cap.num_layers), desc="compare", unit="layer", disable=not progress):
        part = parts / f"layer_{layer:03d}.parquet"
        fit_part = parts / f"fits_{layer:03d}.json"
        state_part = parts / f"fits_{layer:03d}.safetensors"
        if part.exists() and fit_part.exists() and state_part.exists():
            tables.append(pd.read_parquet(part))
            fits.extend(json.loads(fit_part.read_text()))
            states.update(load_fits(state_part))
            continue
        table, layer_fits, layer_states = _layer_rows(cap, layer, config, progress=progress, device=device)
        save_fits(state_part, layer_states)
        atomic_write_json(fit_part, layer_fits)
        atomic_write_table(part, table)  # written last: its presence marks the layer done
        tables.append(table)
        fits.extend(layer_fits)
        states.update(layer_states)

    result = pd.concat(tables, ignore_index=True)
    result["model"] = cap.manifest.get("model")
    result["fit_steps"] = config.fit.steps
    result["fit_lr"] = config.fit.lr
    result["fit_seed"] = config.fit.seed
    result["fit_max_rows"] = config.fit.max_rows
    result["row_stride"] = config.row_stride
    # the parsed spec as typed columns beside `variant`; the figures' numbers as their own tables
    from hla_analysis.figure_tables import write_figure_tables
    from hla_analysis.spec import add_spec_columns

    result = add_spec_columns(result, head_dim=cap.head_dim)
    atomic_write_table(out, result)
    write_figure_tables(cap, result, out)
    fits_table = pd.DataFrame(
        fits, columns=["layer", "variant", "params_per_head", "loss_initial", "loss_final", "steps"])
    atomic_write_table(out.with_name(out.stem + ".fits.csv"), fits_table)
    save_fits(fits_path(out), states, settings={k: v for k, v in settings.items() if k != "device"})
    atomic_write_json(out.with_name(out.stem + ".settings.json"),
                      {**settings, "seconds": round(time.perf_counter() - started, 2)})
    shutil.rmtree(parts)
    return result


def load_results(path: str | Path) -> pd.DataFrame:
    """Read a results table written by :func:`run_comparison`, checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results table at {path}; run `hla-analysis compare` first.")
    if path.suffix not in (".parquet", ".csv"):
        raise ValueError(f"{path} is not a results table: `hla-analysis compare` writes .parquet or .csv.")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pandas/pyarrow raise many types for a damaged file
        raise ValueError(f"cannot read {path} as a results table ({exc}); rerun `hla-analysis compare`.") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        if "swap_mode" in table.columns:  # evaluate's model-level table (hla_analysis.evaluate.COLUMNS)
            raise ValueError(f"{path} is a model-level table from `hla-analysis evaluate`; this reads the "
                             "per-head table `hla-analysis compare` writes.")
        raise ValueError(f"{path} is not an hla-analysis results table (missing columns {missing}).")
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per-variant summary of held-out rows: mean and worst KL, output error, failures.

    ``worst`` is the largest per-head mean KL; failure rate is the mean fraction of rows
    with a non-positive normalizer or invalid weights. Sorted by mean held-out KL, with the
    variants that fail on more than 1% of rows last (their KL covers surviving rows only).
    """
    held = table[table["split"] == "heldout"]
    wide = held.pivot_table(index=["variant", "input", "layer", "head"], columns="metric", values="value")
    grouped = wide.groupby(level="variant")
    summary = pd.DataFrame({
        "kl_mean": grouped["kl_mean"].mean(),
        "kl_worst_head": (wide.groupby(level=["variant", "layer", "head"])["kl_mean"].mean()
                          .groupby(level="variant").max()),
        "output_rel": grouped["output_rel"].mean(),
        "tv_mean": grouped["tv_mean"].mean(),
        "topk_recall": grouped["topk_recall_mean"].mean(),
        "spearman": grouped["spearman_mean"].mean(),
        "failed_rows": grouped["failed_fraction"].mean(),
    })
    params = table.groupby("variant")["params_per_head"].max()
    summary["params_per_head"] = params.reindex(summary.index).fillna(0).astype(int)
    # Variants that fail on more than 1% of rows go last: their KL covers the surviving rows only.
    summary["_unreliable"] = summary["failed_rows"] > 0.01
    return summary.sort_values(["_unreliable", "kl_mean"]).drop(columns="_unreliable")
