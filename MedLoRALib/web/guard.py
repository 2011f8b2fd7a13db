"""What the page shows when an action fails: the cause in words, never a traceback.

A ``MedLoRAError`` says what was wrong and what to do; its message goes to the page as is.
Anything else is a bug: its traceback goes to the server's log and the page says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from ..errors import MedLoRAError

log = logging.getLogger("MedLoRALib.web")


def message_for(exc: BaseException) -> str:
    if isinstance(exc, MedLoRAError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    return f"unexpected error ({type(exc).__name__}: {exc}); the details are in the server's log."


def guarded(method: Callable) -> Callable:
    """Run a page action; on failure put its message in ``state.error``.

    The message stays until an action that starts anew (opening a study, importing points,
    scoring, batch scoring, training) clears it, so a background job's failure is not wiped by a
    click elsewhere.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
        except Exception as exc:  # the page shows every failure; bugs are logged with their traceback
            if not isinstance(exc, (MedLoRAError, OSError)):
                log.exception("page action %s failed", method.__name__)
            self.state.error = message_for(exc)
            self.state.busy = False
            return None
        return result

    return wrapper
