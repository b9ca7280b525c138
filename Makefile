# Set-up and the two everyday commands. `make train` and `make test` install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The tests open a run's report page in a real browser (tests/test_run_experience.py).
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup train test bench

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium chromium-driver

setup: $(FASHION_MNIST)
	$(PIP) install -q -e '.[dev]'

# The embedded default: DeepCluster on Fashion-MNIST, exported to runs/fashion_mnist/export.
train: setup
	$(PYTHON) -m dc_tf.train --flagfile=flags/fashion_mnist.cfg

# Two workers (pytest-xdist), each test file on one of them so that a file's trained fixtures
# are built once, and TensorFlow, FAISS (OpenMP) and numpy (OpenBLAS) on one thread in every
# process the tests start (two workers and their training subprocesses already share two
# cores): 13 minutes instead of 22 on a 2-core machine (bench/RESULTS.md §12).
TEST_THREADS = TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 \
	OPENBLAS_NUM_THREADS=1
test: setup $(CHROMEDRIVER)
	$(TEST_THREADS) $(PYTHON) -m pytest -q -n 2 --dist loadfile tests

bench: setup
	$(PYTHON) bench/train_overhead.py

# Bazel's pinned dependencies (MODULE.bazel's pip.parse): setup.py's requirements and their
# closure, at the versions installed here (`make -B requirements_lock.txt` after an upgrade).
requirements_lock.txt: setup.py tools/lock_requirements.py
	$(PYTHON) tools/lock_requirements.py $@
