# nocluster: `make run` starts a node on embedded defaults; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
# The end-to-end admin test drives Debian's Chromium (Playwright never downloads a browser here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test lint format bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

# A development node: DEBUG on (the settings default is off), unless DJANGO_DEBUG says otherwise.
run: export DJANGO_DEBUG ?= true
run: setup
	$(PY) manage.py migrate --noinput
	@echo ""
	@echo "  nocluster node on embedded defaults (SQLite, local cache, pub/sub, queue and locks)"
	@echo "  Admin:  http://127.0.0.1:8000/admin/"
	@echo "  Create an admin user first (in another shell): $(PY) manage.py createsuperuser"
	@echo ""
	$(PY) manage.py runserver 127.0.0.1:8000

test: setup $(CHROMIUM)
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Dramatiq and pika only for the benchmarks (event_queue.py runs Dramatiq beside the event queue).
bench: setup
	$(PY) -m pip install --quiet -r benchmarks/requirements.txt
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) db.sqlite3 staticfiles
