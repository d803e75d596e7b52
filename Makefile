# Set-up is part of every entry point: `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-slow test-unit test-services test-stack test-operator lint crds sync-crds proto bench soak fuzz e2e clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, from the CPU wheel pip finds on this machine (never through uv: CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[serving,operator,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dify-mirror serve -f examples/quickstart.yaml

# Two processes: the unit group must never share a process with the stack's Ray (an
# in-process gateway there found the real Serve, and its handles outlived ray.shutdown).
test: $(STAMP)
	$(PY) -m pytest -m "not slow" tests/operator tests/services tests/stack
	$(PY) -m pytest -m "not slow" tests/unit -n 2

# The tests that take minutes each (their own Ray stacks, a stack killed and restarted).
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# One group of tests/ each (see tests/conftest.py); test-unit needs nothing running and
# spreads over two processes (CPU-bound: in-process gateways, CLI subprocesses).
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -m unit -n 2

test-services test-stack test-operator: test-%: $(STAMP)
	$(PY) -m pytest tests/$* -m $*

lint: $(STAMP)
	$(VENV)/bin/ruff check serving operator tests bench e2e
	$(VENV)/bin/ruff format --check serving operator tests bench e2e
	$(VENV)/bin/mypy serving operator
	$(VENV)/bin/lint-imports

crds: $(STAMP)
	$(PY) -m dify_serving.crdgen crds

# The chart's copies of the CRDs and of the alert rules and dashboard (Helm reads only
# files inside the chart); tests/unit/test_chart.py fails when they differ.
CHART := charts/dify-mirror
sync-crds:
	cp crds/*.yaml $(CHART)/crds/
	cp observability/prometheus/alerts.yaml observability/grafana/dify-mirror.json $(CHART)/files/

# gRPC stubs from dify.proto (generated, committed; tests/unit/test_grpc_schema.py fails
# when they are stale). grpcio-tools is pinned in dev so the output is the same anywhere.
PROTO := serving/dify_serving/grpc/dify.proto
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I serving --python_out=serving --pyi_out=serving \
		--grpc_python_out=serving $(PROTO)

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[serving,operator,dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m bench

# A mixed load on the quickstart stack from a second process (SOAK_SECONDS=120, or
# SOAK_REQUESTS=N of each kind); fails on an error or a process growing past its bound.
soak: $(STAMP)
	$(PY) -m bench.soak --json .dify-mirror/soak.json

# Schemathesis against the gateway's /openapi.json, longer than make test's 10 examples
# per operation (tests/unit/test_fuzz.py).
FUZZ_EXAMPLES ?= 300
fuzz: $(STAMP)
	DIFY_MIRROR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/unit/test_fuzz.py -m unit

# The whole product on a throwaway kind cluster (docker, kind, kubectl and helm needed;
# it stops at once naming what is missing): e2e/kind.sh. Not part of `make test`.
e2e: $(STAMP)
	PYTHON=$(PY) bash e2e/kind.sh

clean:
	rm -rf $(VENV) .dify-mirror
