# Every target sets up (or reuses) the local virtualenv first, so each works on a fresh machine.
# The system's python3 when it is >= 3.11 and can make a venv (Debian's: built with profile-guided
# optimization, libpython linked into the binary), else the first python3 on PATH. An interpreter
# built from source without --enable-optimizations (pyenv's default, the one on PATH on this machine kind)
# ran postmux with 9-18% more CPU a message than Debian's (bench/README.md, "A seventh round"). `make PYTHON=...`
# picks another; a .venv made by an earlier one is kept until it is removed (rm -rf .venv).
SYSTEM_PYTHON := $(shell /usr/bin/python3 -c 'import sys, ensurepip; print(sys.version_info >= (3, 11))' 2>/dev/null)
PYTHON ?= $(if $(filter True,$(SYSTEM_PYTHON)),/usr/bin/python3,python3)
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test lint unit bench chaos clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/postmux demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Two pytest processes (pytest-xdist): the suite mostly waits on timers, sockets and fsyncs (one process
# kept the 2 cores ~30% busy), so two take about 5.6 minutes where one took 10.3 on this machine kind.
# Every test makes its own ports, files, database and Redis prefix, so the two do not meet.
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2

unit: setup
	$(BIN)/python -m pytest -q tests/unit

# The full chaos run (tests/chaos, marker `chaos`; make test runs only its 200-message guard). It prints
# `chaos: sent=... unfinished=0`. The run has its own deadline; `timeout` is the backstop (SIGINT lets
# pytest clean up the postmux process and the upstreams). Beside it, the shared limit through a minute
# without Redis (test_shared_limit_redis_outage.py, about 140 s on a loaded machine): 280 s + 140 s + margin.
chaos: setup
	timeout -s INT -k 30 600 $(BIN)/python -m pytest -q -p no:cacheprovider -s -m chaos \
		-o faulthandler_timeout=400 tests/chaos

bench: setup
	$(BIN)/python bench/throughput.py

.PHONY: bench-balance
bench-balance: setup
	$(BIN)/python bench/balance.py

# The AIMD curve needs matplotlib for its plot (the figures print without it).
.PHONY: bench-aimd
bench-aimd: setup
	$(BIN)/pip install -q matplotlib
	$(BIN)/python bench/aimd.py

.PHONY: bench-vs-postfix bench-policy bench-queue-scale
bench-vs-postfix: setup
	$(BIN)/python bench/vs_postfix.py

# Both sign with one RSA-2048 key: postmux's [[dkim]], Postfix through Debian's OpenDKIM milter (issue 14).
.PHONY: bench-vs-opendkim
bench-vs-opendkim: setup
	$(BIN)/python bench/vs_postfix.py --dkim --sizes 1500,51200 --workers 2

bench-policy: setup
	$(BIN)/python bench/policy_pick.py

bench-queue-scale: setup
	$(BIN)/python bench/queue_scale.py

# The PostgreSQL spool's commit path with each driver (issue 17); psycopg only for this comparison.
.PHONY: bench-pg-commit
bench-pg-commit: setup
	$(BIN)/pip install -q 'psycopg[binary]'
	$(BIN)/python bench/pg_commit.py

# 1, 2 and 3 nodes on one PostgreSQL spool (and Redis throttles) beside 1 SQLite node and Postfix, in rounds;
# a database (postmux_bench_<random>) and a Redis key prefix of each run's own, removed after it (issue 17).
.PHONY: bench-nodes
bench-nodes: setup
	$(BIN)/python bench/nodes.py

.PHONY: bench-http
bench-http: setup
	$(BIN)/python bench/http_submit.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache

# The dashboard's charts (uPlot) are vendored into the package (src/postmux/admin/static/vendor/README.md
# says why): this takes the pinned version again from the npm registry and checks it against the digests.
UPLOT_VERSION = 1.6.32
VENDOR = src/postmux/admin/static/vendor
.PHONY: vendor-uplot
vendor-uplot:
	rm -rf build/uplot && mkdir -p build/uplot
	cd build/uplot && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null && tar xzf uplot-$(UPLOT_VERSION).tgz
	cp build/uplot/package/dist/uPlot.iife.min.js build/uplot/package/dist/uPlot.min.css $(VENDOR)/
	cp build/uplot/package/LICENSE $(VENDOR)/uPlot.LICENSE
	cd $(VENDOR) && grep -E '^    [0-9a-f]{64}  ' README.md | sed 's/^    //' | sha256sum -c

.PHONY: bench-dashboard
bench-dashboard: setup
	$(BIN)/python bench/dashboard.py
