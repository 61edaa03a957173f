"""Turn documents into model inputs of at most ``max_tokens`` tokens each."""

from __future__ import annotations

from dataclasses import dataclass

from hla_analysis.capture.texts import Document

PACKINGS = ("pack", "document")


@dataclass(frozen=True)
class PlannedInput:
    """Token ids of one input (special tokens included) and the documents they came from."""

    input_ids: tuple[int, ...]
    sources: tuple[str, ...]


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    # What the tokenizer adds around any text, e.g. [CLS] ... [SEP] for BERT, nothing for SmolLM2.
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare):])
    return [], []


def plan_inputs(tokenizer, documents: list[Document], *, num_inputs: int, max_tokens: int,
                packing: str = "pack") -> list[PlannedInput]:
    """Tokenize documents into ``num_inputs`` inputs.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    documents : list of Document
    num_inputs, max_tokens : int
        Inputs wanted and tokens per input, special tokens included.
    packing : {"pack", "document"}
        ``"pack"``: concatenate all documents and cut the token stream into windows of
        exactly ``max_tokens`` (the last may be shorter), so long-sequence studies get the
        length they ask for. ``"document"``: one input per document, truncated to
        ``max_tokens``, so lengths vary with the documents.

    Raises
    ------
    ValueError
        If the documents hold too few tokens for the inputs asked for.

    Examples
    --------
    >>> from hla_analysis.capture.models import load_model
    >>> tok = load_model("minilm").tokenizer
    >>> docs = [Document("x", "one two three four five six seven eight nine ten")]
    >>> [len(p.input_ids) for p in plan_inputs(tok, docs, num_inputs=3, max_tokens=6)]
    [6, 6, 4]
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    prefix, suffix = _special_tokens(tokenizer)
    room = max_tokens - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text next to "
                         f"{len(prefix) + len(suffix)} special tokens")

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long documents trip the "longer than the model" warning
    try:
        planned: list[PlannedInput] = []
        stream: list[int] = []
        owners: list[int] = []
        for index, doc in enumerate(documents):
            ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            if packing == "document":
                planned.append(PlannedInput(tuple(prefix + ids[:room] + suffix), (doc.source,)))
                if len(planned) == num_inputs:
                    return planned
                continue
            stream.extend(ids)
            owners.extend([index] * len(ids))
            if len(stream) >= num_inputs * room:
                break
    finally:
        hf_logging.set_verbosity(verbosity)
    if packing == "pack":
        for start in range(0, min(len(stream), num_inputs * room), room):
            window = stream[start:start + room]
            sources = tuple(documents[i].source for i in dict.fromkeys(owners[start:start + room]))
            planned.append(PlannedInput(tuple(prefix + window + suffix), sources))
    if len(planned) < num_inputs:
        raise ValueError(
            f"the texts give only {len(planned)} inputs (packing={packing!r}, max_tokens={max_tokens}) but "
            f"num_inputs={num_inputs}; lower num_inputs or max_tokens, or add more text"
        )
    return planned
