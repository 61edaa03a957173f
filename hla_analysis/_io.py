"""Atomic writes: every result file appears whole or not at all.

Data goes to a temporary file beside the target, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so an interrupted run never leaves a
half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: str | Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    ``write`` gets a binary file object; whatever it writes appears at ``path`` whole or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def atomic_write_table(path: str | Path, table) -> None:
    """Atomically write a pandas DataFrame as ``.csv`` or ``.parquet`` (by suffix), no index."""
    path = Path(path)
    if path.suffix == ".parquet":
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        atomic_write_bytes(path, table.to_csv(index=False).encode())


def atomic_save_figure(fig, path: str | Path, **savefig_kwargs) -> None:
    """Atomically save a matplotlib figure (format from the suffix)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def written_by(settings: str | Path, tool: str, output: str | Path | None = None) -> bool:
    """Whether ``settings`` (a JSON file) carries ``"tool": tool``: the mark a command leaves on its outputs.

    With ``output``, the file must also name that output (``"output": <file name>``): ``x.csv`` and
    ``x.parquet`` share ``x.settings.json``, so the mark says which of the two it belongs to.
    """
    try:
        data = json.loads(Path(settings).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("tool") != tool:
        return False
    if output is None:
        return True
    output = Path(output)
    if "output" not in data:  # written before outputs were named: ours unless a same-stem table shares it
        return not any(output.with_suffix(s).exists() for s in (".csv", ".parquet") if s != output.suffix)
    return data["output"] == output.name


def settings_owner(settings: str | Path) -> str | None:
    """The output file name a settings file says it belongs to (None when it names none)."""
    try:
        data = json.loads(Path(settings).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    owner = data.get("output") if isinstance(data, dict) else None
    return owner if isinstance(owner, str) else None


def refuse_capture_folder(folder: Path, option: str) -> None:
    """Refuse to write results into a capture's folder: it must hold only the capture's own
    files, or rerunning the capture (its resume) refuses the folder. One-line ``ValueError``."""
    if any((Path(folder) / name).is_file() for name in ("manifest.json", "manifest.partial.json")):
        raise ValueError(f"{folder} holds a capture, which keeps only its own files (so that it can resume); "
                         f"give {option} a path outside it.")


def refuse_foreign_outputs(out: Path, outputs: list[Path], *, settings: Path, tool: str, overwrite: bool,
                           announce: bool = True) -> None:
    """Refuse, before any work, outputs of ``tool`` that cannot be written or belong to the user.

    ``outputs`` are every file a run writes beside ``out`` (``out`` included); ``settings`` is the
    one among them whose ``"tool"`` entry marks them as the tool's own (:func:`written_by`).
    ``<out>.parts`` must be a folder and every output a file; existing outputs the tool did not
    write are refused unless ``overwrite``. One-line ``ValueError`` naming the fix. With
    ``overwrite`` (and ``announce``), each existing output the run will replace is named on
    stderr, one line each, saying whether an earlier run of ``tool`` wrote it.
    """
    refuse_capture_folder(out.parent, "--out")
    parts = out.with_name(out.name + ".parts")
    if parts.exists() and not parts.is_dir():
        raise ValueError(f"{parts} exists and is not a folder; choose another --out.")
    folders = [p for p in outputs if p.is_dir()]
    if folders:
        raise ValueError(f"{folders[0]} exists and is a folder; choose another --out.")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"{out.parent} is not a folder; choose another --out.")
    existing = [p for p in outputs if p.exists()]
    owner = settings_owner(settings)
    if existing and not overwrite and written_by(settings, tool) and owner and owner != out.name:
        raise ValueError(f"{settings} belongs to {out.with_name(owner)}, whose side files share the name stem of "
                         f"{out}; choose another --out (e.g. another name, not another suffix).")
    if existing and not overwrite and not written_by(settings, tool, out):
        names = ", ".join(str(p) for p in existing)
        verb, them = ("exists", "it") if len(existing) == 1 else ("exist", "them")
        raise ValueError(f"{names} already {verb} and `{tool}` did not write {them}; choose another --out, "
                         f"or pass --overwrite (overwrite=True in Python) to replace {them}.")
    if existing and overwrite and announce:
        _announce_replaced(existing, settings, tool)
    if existing and not overwrite:  # ours by the settings: each file must still be what the run wrote
        written = _settings_files(settings)
        changed = [p for p in existing if p != settings and p.name in written and file_sha256(p) != written[p.name]]
        if changed:
            raise ValueError(f"{changed[0]} was changed or replaced since `{tool}` wrote it; move it away, "
                             "or pass --overwrite (overwrite=True in Python) to replace it.")


def _announce_replaced(existing: list[Path], settings: Path, tool: str) -> None:
    """One stderr line per file ``--overwrite`` will replace, naming it and who wrote it."""
    ours = written_by(settings, tool)
    recorded = _settings_files(settings) if ours else {}
    for path in existing:
        earlier = path.name in recorded or (path == settings and ours)
        why = f"an earlier `{tool}` run wrote it" if earlier else f"`{tool}` did not write it"
        print(f"--overwrite: will replace {path} ({why})", file=sys.stderr)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def written_files(paths: list[Path]) -> dict[str, str]:
    """``{file name: SHA-256}`` of the files a run just wrote, for its settings file (``"files"``)."""
    return {p.name: file_sha256(p) for p in paths if p.is_file()}


def _settings_files(settings: Path) -> dict[str, str]:
    try:
        files = json.loads(Path(settings).read_text()).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}  # settings written before the digests: none to check


LOCK_NAME = ".hla-analysis.lock"


def refuse_busy_siblings(out: Path, *, command: str) -> None:
    """Refuse while another run writes an output of the same name stem (``x.csv`` beside
    ``x.parquet``): their side files (``x.settings.json``, ``x.fits.*``) are shared by name.

    Called while holding ``out``'s own lock. Each run takes its own lock first and then probes
    its siblings', so of two runs that start together at least one is refused.
    """
    import fcntl

    for suffix in (".csv", ".parquet"):
        sibling = out.with_suffix(suffix)
        lock = sibling.with_name(sibling.name + ".parts") / LOCK_NAME
        if sibling == out or not lock.is_file():
            continue
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(
                    f"another hla-analysis process is writing to {sibling}, whose side files "
                    f"({out.stem}.settings.json, {out.stem}.fits.*) {out.name} would share; wait for it to "
                    f"finish or give {command} another name") from None


def check_parts_folder(parts: Path, tool: str) -> dict | None:
    """The settings a run left in its ``<out>.parts`` folder, read under the output lock.

    None when there are none yet. A folder holding other files without those settings is not
    a run's to resume or to remove at the end (a user's folder of that name), and a settings
    file that does not parse is damaged: both are refused with a one-line ``ValueError``.
    """
    settings = parts / "settings.json"
    if not settings.exists():
        foreign = sorted(p.name for p in parts.iterdir() if p.name != LOCK_NAME and not p.name.startswith("claim_"))
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise ValueError(f"{parts} holds files but no settings.json of a `{tool}` run "
                             f"({', '.join(foreign[:3])}{more}); it is not one to resume: "
                             "move it away or choose another --out.")
        return None
    try:
        data = json.loads(settings.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"{settings} is damaged (not the settings `{tool}` writes); delete {parts} and rerun.")
    return data


@contextlib.contextmanager
def exclusive_output_lock(folder: str | Path, *, command: str):
    """Hold an exclusive ``fcntl.flock`` on ``folder/.hla-analysis.lock`` while writing there.

    A second writer into the same folder fails at once with a one-line ``ValueError``
    instead of interleaving its files with ours. The lock dies with the process (even on
    SIGKILL), so a crashed run never leaves a stale lock behind.

    Parameters
    ----------
    folder : str or Path
        The output folder (created if missing).
    command : str
        The command taking the lock, named in the error (e.g. ``"capture"``).

    Raises
    ------
    ValueError
        If another process holds the lock on ``folder``.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another hla-analysis process is writing to {folder} (lock {folder / LOCK_NAME}); "
                f"wait for it to finish or give {command} a different output path") from None
        yield folder
    finally:
        handle.close()  # closing the descriptor releases the lock
