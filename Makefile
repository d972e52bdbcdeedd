# The two commands of the README: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint peers bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A regular (not editable) install, so twistd finds the plugin exactly as users will.
install: $(BIN)/python
	$(BIN)/pip install -q ".[test]"
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
.PHONY: install

# Says where the service listens and what to do next, then runs it in the foreground (Ctrl-C stops it).
run: install
	@$(BIN)/python -c 'import sys; from bearerbridge.cli import announce; announce(sys.argv[1] or None)' "$(CONFIG)"
	$(BIN)/twistd -n bearerbridge $(if $(CONFIG),--config $(CONFIG))

# Real peers (Chromium, Prometheus, ...) from Debian's archive; needs root.
peers:
	scripts/install-peers

# The Node packages of tests/js (openid-client for tests/test_rp_openid_client.py), when npm is
# here; without it that test skips (and fails under CI=true). npm ci again only after the lock changes.
JS_PACKAGES := tests/js/node_modules/.package-lock.json
$(JS_PACKAGES): tests/js/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/js --silent --no-audit --no-fund; \
	 else echo "npm not found: tests/test_rp_openid_client.py skips"; fi

# The Node packages come after the peers, which may be what brings npm.
test: install
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then scripts/install-peers; \
	 else echo "not root: peer tests skip where their peer is missing"; fi
	@$(MAKE) -s $(JS_PACKAGES)
	$(BIN)/pytest $(PYTEST_ARGS)

# Style (ruff), types (mypy) and the rules of the rooms (import-linter contracts in
# pyproject.toml), on the working tree. The tools come with the `lint` extra, installed once.
$(BIN)/lint-imports: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q ".[lint]"
	touch $@

lint: $(BIN)/lint-imports
	$(BIN)/ruff check src tests bench examples twisted
	PYTHONPATH=src $(BIN)/mypy
	PYTHONPATH=src $(BIN)/lint-imports --no-cache

bench: install
	$(BIN)/python bench/http_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist
