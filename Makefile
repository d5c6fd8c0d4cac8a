# The two commands of the README:
#   make demo   installs everything and runs the main job (tswitch demo)
#   make test   installs everything and runs the test suite (what .ci/run calls)
# and, for development, make test-fast: the suite without the tests marked slow (minutes, not tens).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# constraints.txt pins torch/torchvision: pip must never resolve an unpinned torch.
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/tswitch demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_encoding.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
