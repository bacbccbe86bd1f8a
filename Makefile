# Every target bootstraps .venv itself, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-quick lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m squibd.demo

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/run_all.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check squibd tests bench
	$(VENV)/bin/mypy --strict squibd

clean:
	rm -rf $(VENV) build *.egg-info

# The snapshot-format demo of issue 2 (no daemon, no KVM): write a pair, describe it,
# describe a corrupted copy.
.PHONY: demo-format
demo-format: $(STAMP)
	$(PY) -m squibd.demo_format
