# Two commands for a new user:  `make train` (short MSA-PT run on CPU)  and  `make test`.
# Both create or reuse the project venv in .venv and install the pinned dependencies.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv train test test-gpu clean

venv: $(STAMP)

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel on this machine kind; clusters bring their CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# megatron-core 0.19.2 declares Python >= 3.12 but its cp311 wheel works; its real needs are pinned above.
	$(PY) -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	# DeepSpeed (ZeRO checkpoint import) is an sdist whose setup imports torch: build it against the torch
	# installed above, without its optional C++/CUDA ops (DeepSpeed JIT-builds the ones a run needs).
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

CORPUS := .cache/stdlib

train: $(STAMP)
	# The embedded corpus (stdlib sources + a BPE tokenizer trained on them): built once, then cached.
	$(PY) -m data_prep.corpus --out $(CORPUS)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(ARGS)

clean:
	rm -rf $(VENV) outputs .cache
