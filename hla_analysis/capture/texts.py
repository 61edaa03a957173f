"""Text corpora to feed a model: the one every CPython ships, or the user's own files.

Model hubs and dataset downloads are out of reach on many machines, so the default
corpus is the language-reference topics of ``pydoc_data.topics`` (about 465,000
characters of real English technical prose, present in every CPython install).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Suffixes read when ``--text`` names a folder (a single file is read whatever its suffix).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Document:
    """One text and where it came from (kept in the capture manifest)."""

    source: str
    text: str


def default_documents() -> list[Document]:
    """The Python language-reference topics that ship with CPython, in a fixed order.

    Returns
    -------
    list of Document
        One document per topic, sorted by topic name so captures are reproducible.

    Examples
    --------
    >>> docs = default_documents()
    >>> len(docs) > 50 and all(d.source.startswith("pydoc_data.topics:") for d in docs)
    True
    """
    from pydoc_data.topics import topics

    return [Document(f"pydoc_data.topics:{name}", topics[name]) for name in sorted(topics)]


def read_documents(path: str | Path) -> list[Document]:
    """Read one UTF-8 text file, or every text file under a folder (recursively, sorted).

    Parameters
    ----------
    path : str or Path
        A file (any suffix) or a folder; in a folder only files ending in
        ``.txt``, ``.md``, ``.rst`` or ``.text`` are read.

    Returns
    -------
    list of Document

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If a file is not UTF-8 text, or the folder holds no non-empty text file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (pathlib.Path(tmp) / "a.txt").write_text("Attention is all you need.")
    ...     [d.text for d in read_documents(tmp)]
    ['Attention is all you need.']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text path {str(path)!r} does not exist; pass a text file or a folder")
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{file} is not UTF-8 text ({exc.reason}); convert it to UTF-8 or remove it from the folder"
            ) from None
        if text.strip():
            docs.append(Document(str(file), text))
    if not docs:
        if path.is_file():
            raise ValueError(f"{str(path)!r} holds no text (empty or only whitespace); pass a file with text in it")
        raise ValueError(
            f"no non-empty text found at {str(path)!r}; a folder must contain files ending in "
            f"{', '.join(TEXT_SUFFIXES)}"
        )
    return docs
