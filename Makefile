# The two commands of the README. Each creates .venv when it is missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: demo test bench clean

$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,peers]'
	touch $(VENV_STAMP)

demo: $(VENV_STAMP)
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=$${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120} $(PY) -m flows.pipeline

test: $(VENV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: $(VENV_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/extract.py
	$(PY) bench/tile.py
	$(PY) bench/tokens.py
	$(PY) bench/train.py
	$(PY) bench/knn.py
	$(PY) bench/items.py

clean:
	rm -rf work/ .pytest_cache
