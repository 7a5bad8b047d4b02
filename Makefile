# The two set-up commands of the README are `make demo` and `make test`; each installs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2

.PHONY: install demo test test-fast lint bench clean docker-check

install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/hvd-yolo demo --np $(NP)

test: install
	$(VENV)/bin/hvd-yolo env
	$(PY) -m pytest -ra tests

test-fast: install
	$(PY) -m pytest -ra -m "not slow" tests

lint:
	$(VENV)/bin/ruff check hvd_yolo tests scripts

bench: install
	$(PY) benchmarks/run_matrix.py
	$(PY) benchmarks/cluster_bench.py  # simulated cluster; skips itself, saying why, without root/sshd
	$(PY) benchmarks/scaling_model.py

# Build docker/Dockerfile with a real engine and run a 2-rank demo inside it (docker/check.sh;
# knobs: DOCKER, IMAGE, BASE_IMAGE, TORCH_INDEX_URL, PIP_CERT, BUILD_ARGS).
docker-check:
	bash docker/check.sh

clean:
	rm -rf build dist *.egg-info .pytest_cache runs demo_out
