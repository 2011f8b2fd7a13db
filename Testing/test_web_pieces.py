"""``medlora web`` without a browser: the start on a machine without a display, and the status line.

Without a display VTK is asked for EGL, so there is no X probe and no X warning. The start-up
test runs the real app (``.venv-web`` or ``$MEDLORA_WEB_PYTHON``) with ``DISPLAY`` removed and
reads what it printed (the views and their render windows are made when the app starts). The
browser tests (``test_web.py``) see the status line after an engine death only when the app
finds the engine dead while it answers, so its words are checked here too.
"""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from MedLoRALib.slicer.engine_client import EngineError
from MedLoRALib.web import browser
from MedLoRALib.web.results_view import failure_status
from MedLoRALib.web.views import EGL_WINDOW, prefer_egl_without_display

HAS_EGL = ctypes.util.find_library("EGL") is not None


@pytest.mark.parametrize("environ, expected", [
    ({}, EGL_WINDOW if HAS_EGL else None),
    ({"DISPLAY": ":0"}, None),  # a display: VTK's own choice (X) stays
    ({"DISPLAY": ""}, EGL_WINDOW if HAS_EGL else None),  # set but empty is no display either
    ({"VTK_DEFAULT_OPENGL_WINDOW": "vtkOSOpenGLRenderWindow"}, None),  # the user's choice wins
])
def test_egl_is_named_only_without_a_display_and_without_a_choice_of_the_users(environ, expected):
    before = dict(environ)
    assert prefer_egl_without_display(environ) == expected
    assert environ == ({**before, "VTK_DEFAULT_OPENGL_WINDOW": expected} if expected else before)


@pytest.mark.slow  # the app's start: about 5 s
def test_a_headless_start_prints_no_x_server_warning(shared_data, tmp_path, monkeypatch):
    python = browser.web_python()
    if python is None:
        pytest.skip("no Python with trame-slicer (.venv-web, made by `make test`, or $MEDLORA_WEB_PYTHON)")
    if not HAS_EGL:
        pytest.skip("no libEGL on this machine: VTK falls back to X then OSMesa (docs/web.md)")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW", raising=False)
    web = browser.WebServer(python, shared_data, tmp_path / "store", tmp_path, sys.executable)
    web.stop()
    log = web.log.read_text(errors="replace")
    assert "bad X server connection" not in log and "Failed to" not in log, log[-3000:]
    assert "INFO trame_rca" not in log, log[-3000:]  # start-up chatter about optional encoders is not shown


def test_the_status_line_after_a_failure_says_what_happened_and_what_to_do():
    died = EngineError("the scoring engine stopped while answering 'score' (killed by signal 9); it will be "
                       "restarted on the next request. Its last messages:\n(no output)")
    assert failure_status(None, died, engine_running=False) == \
        "scoring stopped: the scoring engine stopped. Press Score again to restart it."
    refused = EngineError("score: ProtocolError: patches of 2 views, the adapter reads 9\nmore")  # engine still up
    assert failure_status(None, refused, engine_running=True) == \
        "scoring failed: score: ProtocolError: patches of 2 views, the adapter reads 9"
