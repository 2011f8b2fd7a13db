"""The one job interface the widget knows: scoring, batch scoring and training all look like this.

A job is started by the logic and then advanced by ``poll`` from a timer (Slicer) or a loop
(scripts). No method waits: each call does a bounded piece of work (a few slices of a
volume written, the lines a process printed, one answer from the engine) and returns, so
the event loop is never held for long. The widget shows ``progress`` and ``status``, offers
Cancel while not ``finished``, and shows ``results_table`` when there is one.
"""

from __future__ import annotations

import time
from typing import Protocol

from ..errors import MedLoRAError


class Job(Protocol):
    """What the widget (and the module logic) needs from any background job."""

    @property
    def finished(self) -> bool: ...

    @property
    def progress(self) -> float:
        """Fraction done, 0 to 1."""

    @property
    def status(self) -> str:
        """One line for the user."""

    @property
    def results_table(self):
        """The results table node it fills, or ``None`` (training)."""

    def poll(self) -> bool:
        """Advance without waiting; True once finished. Raises ``MedLoRAError`` on failure."""

    def cancel(self) -> None:
        """Ask the job to stop; never waits (poll until ``finished``)."""


class EngineRequestJob:
    """Shared by jobs that are one request to the engine (``ScoreJob``, ``ExplainJob``): no progress
    between not done and done, and the same words while the engine is being started. Needs
    ``finished`` and ``call`` (an ``EngineCall`` or ``None``) from the job."""

    @property
    def progress(self) -> float:
        return 1.0 if self.finished else 0.0

    def waiting_status(self, working: str) -> str:
        """``working`` once the request is with the engine; before, that the engine is starting."""
        return "starting the scoring engine…" if self.call is not None and self.call.starting else working


def run_to_end(job: Job, timeout_s: float, poll_s: float = 0.02) -> Job:
    """Poll a job until it has finished (scripts and tests)."""
    deadline = time.monotonic() + timeout_s
    while not job.poll():
        if time.monotonic() > deadline:
            raise MedLoRAError(f"the job did not finish within {timeout_s:.0f} s ({job.status})")
        time.sleep(poll_s)
    return job
