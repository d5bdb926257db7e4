# kmm-rs developer entry points. `make test` is what CI runs (see .ci/run and README.md).

CARGO ?= cargo
CLUSTER_DIR ?= /tmp/kmm-rs-cluster

.PHONY: test kernel-test lint fmt crds lab lab-down testenv cluster-up cluster-down smoke help bench

help:
	@echo "make test         - lint, then every test tier that is ready (what CI runs)"
	@echo "make kernel-test  - kmm-worker in a real kernel (QEMU): the tier-4 scenarios only"
	@echo "make lint         - cargo fmt --check and clippy with warnings as errors"
	@echo "make crds         - regenerate deploy/crds from the Rust types"
	@echo "make testenv      - build the control-plane binaries into the cache (once)"
	@echo "make cluster-up   - start a local control plane with kwok in CLUSTER_DIR"
	@echo "make cluster-down - stop it"
	@echo "make lab          - run the KMM labs on a local cluster and print what happened (LAB=prebuilt for one)"
	@echo "make lab-down     - stop the lab cluster, registry and operator"
	@echo "make bench        - scale and cost benchmark (BENCH_NODES=500 BENCH_MODULES=10 BENCH_KERNELS=3; bench/report.md)"

test: lint testenv
	KMM_TESTENV_BIN="$$(testenv/build.sh)" $(CARGO) test --workspace --all-targets -- --show-output
	$(CARGO) test --workspace --doc
	testenv/check-stopped.sh
	tests/kernel/run.sh
	scripts/lab.sh ci

kernel-test:
	tests/kernel/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

crds:
	$(CARGO) run -q -p kmm-operator -- crd --out-dir deploy/crds

testenv:
	testenv/build.sh

cluster-up: testenv
	testenv/cluster.sh up --dir $(CLUSTER_DIR)

cluster-down:
	testenv/cluster.sh down --dir $(CLUSTER_DIR)

smoke: testenv
	testenv/smoke.sh

LAB ?= all

lab: testenv
	scripts/lab.sh up --lab $(LAB)

lab-down:
	scripts/lab.sh down

# Scale and cost benchmark (bench/bench.py): never part of `make test`.
bench: testenv
	bench/bench.py run
