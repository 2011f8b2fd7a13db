# Two entry points for a new machine: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast clean system-deps

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/medlora demo --out demo-output

test: $(VENV)/.installed system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests not marked slow (under 3 minutes on 2 cores).
test-fast: $(VENV)/.installed system-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Xvfb lets Slicer's displayable managers render slice views headless (VTK falls back
# to its own off-screen rendering without it). Installed only where we may: as root.
system-deps:
	@{ command -v Xvfb && command -v dciodvfy; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq xvfb dicom3tools >/dev/null) \
	  || echo "note: Xvfb/dicom3tools not installed; rendering uses VTK's off-screen fallback, the SR validator test skips"; }

clean:
	rm -rf $(VENV) demo-output
