# kmm-rs developer entry points. `make test` is what CI runs (see .ci/run and README.md).

CARGO ?= cargo

.PHONY: test lint fmt crds lab help

help:
	@echo "make test   - lint, then every test tier that is ready (what CI runs)"
	@echo "make lint   - cargo fmt --check and clippy with warnings as errors"
	@echo "make crds   - regenerate deploy/crds from the Rust types"
	@echo "make lab    - run the KMM labs locally (not ready yet)"

test: lint
	$(CARGO) test --workspace --all-targets -- --show-output
	$(CARGO) test --workspace --doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

crds:
	$(CARGO) run -q -p kmm-operator -- crd --out-dir deploy/crds

lab:
	@echo "make lab is not ready yet: the local lab lands with the labs issue (kmmctl and labs/)." >&2
	@exit 1
