# The README's two commands:
#   make demo   set up .venv (the right torch for this machine, then the package) and search a schedule for the
#               shipped toy model: schedsearch optimize --budget 0.2 -> schedules/toy-psigmoid-flops0.2-tpe-seed0.json
#   make test   set up .venv the same way and run the test suite (what CI runs, see .ci/run)
# Variables: PYTHON (default python3), VENV (default .venv), TORCH_VERSION, TORCH_INDEX_URL (see
# scripts/install_torch.sh), PYTEST_ARGS (e.g. PYTEST_ARGS='-m "not slow"').

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/cpu.txt scripts/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	sh scripts/install_torch.sh $(BIN)/python $(TORCH_VERSION)
	$(BIN)/python -m pip install -q -c constraints/cpu.txt -e ".[search,test]"
	touch $@

demo: install
	$(BIN)/schedsearch optimize --budget 0.2

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
