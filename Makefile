# Each target creates the virtual environment and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench fuzz fuzz-diff soak clean

$(STAMP): pyproject.toml setup.py src/fastmmio/real/_exitpath.c src/fastmmio/sim/_hooks.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: every route simulated under the 2015 thread's KVM variants, next to this
# host's /dev/kvm when it has one, with the calibration and the verdict (./fastmmio-out/).
run: $(STAMP)
	$(BIN)/fastmmio compare

# The suite on TEST_WORKERS pytest-xdist workers (auto: one per CPU; 0: serially, in this
# process), a test file's tests together on one worker (tests/conftest.py).
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

# Hostile guests on this host's KVM for FUZZ_SECONDS: outcome counts, leaks, hangs
# (fastmmio fuzz hostile --help for seeds, kinds, reproducing one program).
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/fastmmio fuzz hostile --seconds $(FUZZ_SECONDS)
	$(MAKE) fuzz-diff

# Differential fuzzing for FUZZ_SECONDS: random programs on the simulator and on this host's
# KVM; each kind of disagreement is shrunk and saved in tests/kvm/regressions/
# (fastmmio fuzz diff --help for seeds, example counts, program size).
FUZZ_DIFF_EXAMPLES ?= 1000000
fuzz-diff: $(STAMP)
	$(BIN)/fastmmio fuzz diff --examples $(FUZZ_DIFF_EXAMPLES) --seconds $(FUZZ_SECONDS)

# SOAK_NOTIFICATIONS through every in-kernel ioeventfd route: none lost, none to userspace
# (about 30 s per route per million where an in-kernel exit costs ~28 us, as under PVM).
SOAK_NOTIFICATIONS ?= 1000000
soak: $(STAMP)
	$(BIN)/python benchmarks/soak_real.py --notifications $(SOAK_NOTIFICATIONS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
