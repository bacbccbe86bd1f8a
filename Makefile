# Every target bootstraps .venv itself, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-quick lint venv clean install uninstall

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
	$(PY) scripts/demo_format.py

# Install for a host (issue 13): a private venv under $(PREFIX)/lib/squibd holding a
# regular (not editable) install of this tree, squibd and squibctl linked into
# $(PREFIX)/bin, the systemd units (ExecStart = $(PREFIX)/bin/squibd) and the shell
# completions. PREFIX is where it runs from (the venv is not relocatable).
PREFIX ?= /usr/local
UNITDIR ?= /etc/systemd/system
APPDIR := $(PREFIX)/lib/squibd
install:
	$(PYTHON) -m venv $(APPDIR)
	$(APPDIR)/bin/pip install -q --disable-pip-version-check .
	install -d $(PREFIX)/bin $(UNITDIR)
	ln -sf $(APPDIR)/bin/squibd $(PREFIX)/bin/squibd
	ln -sf $(APPDIR)/bin/squibctl $(PREFIX)/bin/squibctl
	sed 's#/usr/local/bin/squibd#$(PREFIX)/bin/squibd#' systemd/squibd.service \
		> $(UNITDIR)/squibd.service
	install -m 0644 systemd/squibd.socket $(UNITDIR)/squibd.socket
	install -d $(PREFIX)/share/bash-completion/completions \
		$(PREFIX)/share/zsh/site-functions
	$(APPDIR)/bin/squibctl completion bash \
		> $(PREFIX)/share/bash-completion/completions/squibctl
	$(APPDIR)/bin/squibctl completion zsh \
		> $(PREFIX)/share/zsh/site-functions/_squibctl
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now squibd.socket"

uninstall:
	rm -f $(PREFIX)/bin/squibd $(PREFIX)/bin/squibctl \
		$(UNITDIR)/squibd.service $(UNITDIR)/squibd.socket \
		$(PREFIX)/share/bash-completion/completions/squibctl \
		$(PREFIX)/share/zsh/site-functions/_squibctl
	rm -rf $(APPDIR)
