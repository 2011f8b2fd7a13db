# Two entry points for a new machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# medlora web runs on trame-slicer, which needs slicer-core 5.11; the rest of MedLoRA is tested on the
# newest slicer-core. So the web app gets its own torch-free environment (docs/web.md).
WEB_VENV ?= .venv-web
WEB_PY   := $(WEB_VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast clean system-deps

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e '.[test]'
	touch $@

# the `web` extra alone (its engine and trainer run in $(VENV)): that list, then MedLoRA with --no-deps
$(WEB_VENV)/.installed: pyproject.toml
	test -x $(WEB_PY) || $(PYTHON) -m venv $(WEB_VENV)
	$(WEB_PY) -m pip install --quiet --upgrade pip
	$(WEB_PY) -m pip install --quiet $$($(WEB_PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["web"]))')
	$(WEB_PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/medlora demo --out demo-output

test: $(VENV)/.installed $(WEB_VENV)/.installed system-deps
	$(VENV)/bin/ruff check .
	MEDLORA_WEB_PYTHON=$(WEB_PY) $(PY) -m pytest $(PYTEST_ARGS)

# The tests not marked slow (under 3 minutes on 2 cores).
test-fast: $(VENV)/.installed system-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Xvfb lets Slicer's displayable managers render slice views headless (VTK falls back
# to its own off-screen rendering without it); Chromium runs the web app's browser tests.
# Installed only where we may: as root.
system-deps:
	@{ command -v Xvfb && command -v dciodvfy && command -v chromium; } >/dev/null || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq xvfb dicom3tools chromium >/dev/null) \
	  || echo "note: Xvfb/dicom3tools/chromium not installed; rendering uses VTK's off-screen fallback, the SR validator and browser tests skip"; }

clean:
	rm -rf $(VENV) $(WEB_VENV) demo-output
