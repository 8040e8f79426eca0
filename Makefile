# hsci: `make run` trains the default experiment, `make test` runs the fast tests.
# Both set up a local virtual environment (.venv) first when it is missing or out of date.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
# CPU=1 (or TORCH_INDEX=<url>): PyTorch from its own index of CPU-only wheels, for a machine without an NVIDIA GPU
# (Linux, Windows; PyPI's macOS wheels are CPU builds already): ~0.2 GB to download instead of ~3 GB of CUDA wheels.
TORCH_INDEX ?= $(if $(filter 1 yes true,$(CPU)),https://download.pytorch.org/whl/cpu)
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready

.PHONY: setup run test test-all coverage smoke clean

setup: $(READY)

$(READY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(READY)

run: setup  ## train the default experiment (digits, cnn) on this machine
	$(BIN)/hsci train $(ARGS)

test: setup  ## the fast tests (a few minutes on two CPU cores), one worker per core
	$(BIN)/python -m pytest -m "not slow" -q -n auto --dist worksteal

test-all: setup  ## every test, slow ones included
	$(BIN)/python -m pytest -q -n auto --dist worksteal

coverage: setup  ## line coverage of hsci/ by the fast tests, subprocesses included
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m coverage run -m pytest -m "not slow" -q
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report

smoke: setup  ## a seconds-long run through every stage
	$(BIN)/hsci train experiment=smoke

clean:  ## remove run outputs (outputs/README.md stays) and build files (the virtual environment stays)
	find outputs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf multirun dist build .pytest_cache .coverage .coverage.*
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
