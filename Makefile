# The two commands of the README: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test peers bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A regular (not editable) install, so twistd finds the plugin exactly as users will.
install: $(BIN)/python
	$(BIN)/pip install -q ".[test]"
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
.PHONY: install

run: install
	$(BIN)/twistd -n bearerbridge $(if $(CONFIG),--config $(CONFIG))

# Real peers (Chromium, Prometheus, ...) from Debian's archive; needs root.
peers:
	scripts/install-peers

test: install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then scripts/install-peers; \
	 else echo "not root: peer tests skip where their peer is missing"; fi
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/http_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist
