"""Capture q, k, v from any transformers model (text, images, audio, your own tensors), read them back.

Data flows one way: :func:`capture` runs a model and writes a capture directory
(see :mod:`hla_analysis.capture.store` for the format); :func:`load_capture` opens
it for the variants and metrics downstream::

    cap = load_capture(capture("minilm", out="runs/cap", num_inputs=8, max_tokens=256))
    for layer in range(cap.num_layers):
        for i in range(cap.num_inputs):
            d = cap.get(layer, i)   # q, k, v: [heads, N, d]; scale; causal; input_ids (text)

Your own model and inputs: ``capture(vit, inputs=[{"pixel_values": x}], out=...)``.

Modules: ``texts`` (corpora), ``models`` (embedded models and loading), ``inputs``
(tokenizing into inputs), ``sources`` (text, tensor and image inputs), ``recorder`` (the
generic attention hook), ``scale_split`` (the canonical q/k scale split), ``manifest``
(schema and content hash), ``store`` (on-disk format and loader), ``run`` (the capture loop).
"""

from hla_analysis.capture.models import EMBEDDED_MODELS, load_model
from hla_analysis.capture.run import capture
from hla_analysis.capture.store import Capture, load_capture
from hla_analysis.capture.texts import Document, default_documents, read_documents

__all__ = ["capture", "load_capture", "Capture", "load_model", "EMBEDDED_MODELS",
           "Document", "default_documents", "read_documents"]
