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
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from hla_analysis import __version__
from hla_analysis._checks import check_batch
from hla_analysis._io import (
    atomic_write_json,
    atomic_write_table,
    check_parts_folder,
    exclusive_output_lock,
    refuse_busy_siblings,
    refuse_foreign_outputs,
    written_files,
)
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

    @classmethod
    def from_dict(cls, data: dict) -> CompareConfig:
        """The config :meth:`as_dict` wrote (extra keys, such as a settings file's, are ignored)."""
        return cls(variants=tuple(data["variants"]), train_inputs=data["train_inputs"],
                   fit=FitConfig(**data["fit"]), block_rows=data["block_rows"], topk=data["topk"],
                   rank_stride=data["rank_stride"], row_stride=data["row_stride"])


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
        # a causal block sees no key past its last row: those columns are dropped (every weight
        # there is zero, so every metric is the same), which saves ~3/8 of the work at 4 blocks
        horizon = rows.stop if batch["causal"] else n
        k_seen, v_seen = (k, v) if horizon == n else (k[..., :horizon, :], v[..., :horizon, :])
        p = _REFERENCE.attention_map(q_block, k_seen, **kw)[..., sample, :]
        scores = ((q_block @ k_seen.transpose(-1, -2)) * batch["scale"])[..., sample, :]
        allowed = None
        if batch["causal"]:
            allowed = (torch.arange(horizon, device=q.device)[None, :]
                       <= torch.arange(start, rows.stop, device=q.device)[:, None])[sample]
        # checked once here (p, scores, v), then shared by every variant
        ref = reference_rows(p, allowed=allowed, v=v_seen, scores=scores, k=topk, rank_stride=rank_stride,
                             n_keys=n)
        del scores
        # every variant's NaN/Inf checks of this block in one batch: one reduction per tensor
        # and one host read per block (not per variant), same errors, first failure reported
        with check_batch():
            for spec, variant in variants.items():
                if variant.is_reference:  # its weights are the reference itself
                    accs[spec].update_against(ref, p)
                    continue
                if variant.reads_all_keys and horizon < n:  # features that read other keys: all of them
                    weights, den = variant.weights(q_block, k, **kw)
                    weights = weights[..., :horizon]
                else:
                    weights, den = variant.weights(q_block, k_seen, **kw)
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
                        f"input {i} of layer {layer} has a custom attention mask (a sliding window or local "
                        "attention shorter than the input, or padding); the comparison supports padding-free causal "
                        "or bidirectional captures only: capture again with --max-tokens no longer than the window, "
                        "--modules for the global layers, or unpadded inputs."
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
    workers: int | str = "auto",
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
    workers : int or "auto"
        CPU processes that compute layers side by side (layers are independent), each with
        ``torch.get_num_threads() // workers`` threads; this process is one of them. One
        process per core scales better than threads for these many small passes. ``"auto"``
        (default) uses one per thread when there are at least two layers left and each is
        worth a helper's ~2 s start, bounded by memory; always 1 on a GPU. The table does not
        depend on it beyond the rounding of the thread count.
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
    _check_workers(workers, device)
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
    _check_capture_files(cap)
    _reuse_freed_memory()
    created = not parts.exists()
    try:
        with exclusive_output_lock(parts, command="compare"):
            try:
                return _run_locked(cap, capture_dir, out, parts, config, device=device, progress=progress,
                                   workers=workers)
            except BaseException:
                # a run that failed before finishing a layer removes the parts folder it created
                # (only while holding its lock: a run refused by the lock never touches the folder)
                if created and parts.is_dir() and not any(_layer_done(parts, n) for n in range(cap.num_layers)):
                    shutil.rmtree(parts, ignore_errors=True)
                raise
    finally:
        _give_back_memory()


def _check_capture_files(cap) -> None:
    """Every input file the manifest lists is there with its recorded size: checked before any work
    (the hashes are checked as each tensor is read)."""
    for rec in cap.manifest["inputs"]:
        file = cap.path / rec["file"]
        if not file.is_file():
            raise ValueError(f"{file} is missing from the capture; restore it or capture again")
        if file.stat().st_size != rec["bytes"]:
            raise ValueError(f"{file} is {file.stat().st_size} bytes but the manifest records {rec['bytes']} "
                             "(truncated or replaced); capture again")


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


def _check_outputs(out: Path, *, overwrite: bool, announce: bool = True) -> None:
    """Refuse, before any work, outputs that cannot be written or belong to the user; with
    ``overwrite`` (and ``announce``), name on stderr each existing output that will be replaced."""
    outputs = _outputs(out)
    refuse_foreign_outputs(out, outputs, settings=outputs[2], tool=_TOOL, overwrite=overwrite, announce=announce)


def capture_identity(capture_dir: str | Path) -> str:
    """SHA-256 of the capture's ``manifest.json``: which capture a result belongs to."""
    from hla_analysis.capture.store import MANIFEST, file_sha256

    return file_sha256(Path(capture_dir) / MANIFEST)


def _run_locked(cap, capture_dir, out: Path, parts: Path, config: CompareConfig, *, device, progress,
                workers: int | str = "auto") -> pd.DataFrame:
    settings_path = parts / "settings.json"
    settings = {"tool": _TOOL, **config.as_dict(), "key": config.key(),
                "capture": str(Path(capture_dir).resolve()), "capture_sha256": capture_identity(capture_dir),
                "model": cap.manifest.get("model"), "version": __version__, "device": str(device)}
    refuse_busy_siblings(out, command="compare")
    before = check_parts_folder(parts, "compare")
    if before is not None:
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
    todo = [layer for layer in range(cap.num_layers) if not _layer_done(parts, layer)]
    count = _worker_count(workers, cap, config, todo, device)
    threads = torch.get_num_threads()
    bar = tqdm(total=cap.num_layers, initial=cap.num_layers - len(todo), desc="compare", unit="layer",
               disable=not progress)
    for stale in parts.glob("claim_*"):  # claims of an interrupted run (we hold the folder's lock)
        stale.unlink()
    helpers = _LayerHelpers(capture_dir, parts, count - 1, threads=max(1, threads // count), on_layer=bar.update)
    try:
        if count > 1:
            torch.set_num_threads(max(1, threads // count))
        helpers.start()
        for layer in todo:
            helpers.check()  # a helper's error ends the run now, not after this process's layers
            if _claim(parts, layer):
                _compute_layer(cap, layer, config, parts, progress=progress, device=device)
                bar.update()
        helpers.wait()
    finally:
        helpers.stop()
        torch.set_num_threads(threads)
        bar.close()
        for claim in parts.glob("claim_*"):
            claim.unlink()
    tables, fits, states = [], [], {}
    for layer in range(cap.num_layers):
        paths = _layer_paths(parts, layer)
        try:
            tables.append(pd.read_parquet(paths[0]))
            fits.extend(json.loads(paths[1].read_text()))
            states.update(load_fits(paths[2]))
        except Exception as exc:  # noqa: BLE001 - any unreadable part: name the files to recompute
            names = ", ".join(p.name for p in paths)
            raise ValueError(f"layer {layer}'s partial results in {parts} are damaged ({type(exc).__name__}); "
                             f"delete {names} there and rerun: that layer is computed again.") from None

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
                      {**settings, "output": out.name, "seconds": round(time.perf_counter() - started, 2),
                       "files": written_files([p for p in _outputs(out) if not p.name.endswith(".settings.json")])})
    shutil.rmtree(parts)
    return result


def _layer_paths(parts: Path, layer: int) -> tuple[Path, Path, Path]:
    """The table, fits and fitted-state files of one finished layer in ``parts``."""
    return (parts / f"layer_{layer:03d}.parquet", parts / f"fits_{layer:03d}.json",
            parts / f"fits_{layer:03d}.safetensors")


def _layer_done(parts: Path, layer: int) -> bool:
    return all(path.exists() for path in _layer_paths(parts, layer))


def _claim(parts: Path, layer: int) -> bool:
    """Take ``layer`` for this process (atomic create); False if another process took it."""
    try:
        os.close(os.open(parts / f"claim_{layer:03d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return not _layer_done(parts, layer)


def _compute_layer(cap, layer: int, config: CompareConfig, parts: Path, *, progress: bool,
                   device: torch.device) -> None:
    table, layer_fits, layer_states = _layer_rows(cap, layer, config, progress=progress, device=device)
    part, fit_part, state_part = _layer_paths(parts, layer)
    save_fits(state_part, layer_states)
    atomic_write_json(fit_part, layer_fits)
    atomic_write_table(part, table)  # written last: its presence marks the layer done


# A helper process costs ~2 s to start (imports); below this much work per layer (heads x
# query rows x keys x variants) one process is faster.
_HELPER_MIN_CELLS = 2**26
_AUTO_WORKERS_MAX = 8
_WORKER_BYTES = 3 * 2**29  # host memory one CPU worker may take at its peak (1.5 GB, generous)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_workers(workers, device: torch.device) -> None:
    """One-line errors for a ``workers`` that is neither ``"auto"`` nor a usable count."""
    if workers == "auto":
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) must be 'auto' or an integer >= 1, got {workers!r}.")
    if workers > 1 and device.type != "cpu":
        raise ValueError(f"workers (--workers) > 1 splits layers over CPU processes; on {device.type} use 1.")


def _worker_count(workers, cap, config: CompareConfig, todo: list[int], device: torch.device) -> int:
    """Processes that compute layers side by side (1 = this process alone)."""
    _check_workers(workers, device)
    if workers == "auto":
        if device.type != "cpu" or len(todo) < 2:
            return 1
        cells = cap.num_heads * sum(n * n for n in cap.lengths) * len(config.variants) // config.row_stride
        if cells < _HELPER_MIN_CELLS:
            return 1
        memory = _available_memory()
        by_memory = _AUTO_WORKERS_MAX if memory is None else max(1, memory // _WORKER_BYTES)
        return max(1, min(len(todo), torch.get_num_threads(), _AUTO_WORKERS_MAX, by_memory))
    return max(1, min(workers, len(todo)))


class _LayerHelpers:
    """Helper processes of one CPU run: each takes the next unclaimed layer, as this process does.

    Layers are independent (fits and scoring are per layer), and one process per core scales
    better than one process with several threads: the metrics are many small tensor passes.
    Each helper is ``python -m hla_analysis._compare_helper`` (no fork, no re-import of the
    caller's script), writes its layers into ``parts`` exactly as this process does and reports
    each finished layer, or its error, as a JSON line on stdout.
    """

    def __init__(self, capture_dir, parts: Path, count: int, *, threads: int, on_layer) -> None:
        self.args = [str(Path(capture_dir).resolve()), str(parts.resolve()), "--threads", str(threads)]
        self.count, self.threads, self.parts, self.on_layer = count, threads, parts, on_layer
        self.procs: list[tuple[subprocess.Popen, threading.Thread, Path]] = []
        self.errors: list[dict] = []

    def start(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        for i in range(self.count):
            log_path = self.parts / f"helper_{i}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "hla_analysis._compare_helper", *self.args],
                                        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE,
                                        text=True, env=env)
            reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
            reader.start()
            self.procs.append((proc, reader, log_path))

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "done" in message:
                self.on_layer()
            elif "error" in message:
                self.errors.append(message)

    def check(self) -> None:
        """Raise a helper's error as this process would have raised it."""
        for proc, reader, _ in self.procs:
            if proc.poll() not in (None, 0):
                reader.join(timeout=30)  # its last line (the error) is read before deciding
        if self.errors:
            error = self.errors[0]
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(error["error"])
            if kind is not None:
                raise kind(error["message"])
            raise RuntimeError(f"a compare helper process failed: {error['error']}: {error['message']}")
        for proc, _, log_path in self.procs:
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"a compare helper process stopped (exit code {proc.returncode}); "
                                   f"its log is {log_path}. Rerun to resume.")

    def wait(self) -> None:
        for proc, reader, _ in self.procs:
            proc.wait()
            reader.join()
        self.check()

    def stop(self) -> None:
        for proc, reader, _ in self.procs:
            proc.stdin.close()  # the helper's end of the pipe reads EOF: it stops (see _helper_main)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()


def _exit_when_parent_ends() -> None:
    sys.stdin.read()
    os._exit(3)


def _helper_main(argv: list[str] | None = None) -> int:
    """Entry point of one helper process (see :class:`_LayerHelpers`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hla_analysis._compare_helper")
    parser.add_argument("capture")
    parser.add_argument("parts", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    # stdin is a pipe from the parent, which never writes to it: EOF means the parent has
    # ended (even by SIGKILL), and a helper must not go on writing into its parts folder
    threading.Thread(target=_exit_when_parent_ends, daemon=True).start()
    try:
        torch.set_num_threads(args.threads)
        settings = json.loads((args.parts / "settings.json").read_text())
        config = CompareConfig.from_dict(settings)
        if config.key() != settings["key"]:
            raise ValueError(f"{args.parts}/settings.json does not match its own key; rerun the comparison.")
        cap = load_capture(args.capture)
        _reuse_freed_memory()
        for layer in range(cap.num_layers):
            if not _layer_done(args.parts, layer) and _claim(args.parts, layer):
                _compute_layer(cap, layer, config, args.parts, progress=False, device=torch.device("cpu"))
                print(json.dumps({"done": layer}), flush=True)
    except Exception as exc:  # reported to the parent, which raises it as its own
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        raise
    return 0


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
