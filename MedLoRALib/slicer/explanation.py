"""Show where the model looked: one nodule's saliency map as a coloured overlay on its CT.

The engine computes the map on the adapter's own planes (``explain`` request); this
process puts it back onto the CT's grid (``explain.volume``, torch-free) and shows it as
the slice views' foreground (``explain.slicer_overlay``). An ``ExplainJob`` follows the job
interface of ``jobs.py``, so the GUI never waits for the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..explain.slicer_overlay import add_explanation, maps_from_response, show_explanation
from ..explain.volume import saliency_volume
from ..image import CTImage
from ..patches import PatchSpec, extract_patches
from .engine_client import encode_patches
from .jobs import EngineRequestJob
from .mrml import ScenePoint
from .scoring import EngineCall, ScoringSession

METHODS = ("gradxinput", "rollout")


@dataclass
class ExplainJob(EngineRequestJob):
    """One point's explanation in flight: engine setup, the ``explain`` request, then the overlay."""

    session: ScoringSession
    volume_node: object
    image: CTImage
    point: ScenePoint
    adapter: str
    spec: PatchSpec
    method: str = "gradxinput"
    opacity: float = 0.5
    call: EngineCall | None = None
    node: object = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.node is not None or self.cancelled

    @property
    def status(self) -> str:
        if self.cancelled:
            return "explanation cancelled"
        if self.node is not None:
            return f"explanation of {self.point.name} shown ({self.method})"
        return self.waiting_status(f"explaining {self.point.name}…")

    @property
    def results_table(self):
        return None

    def start(self) -> ExplainJob:
        self.call = EngineCall(self.session, "explain", self._request)
        return self

    def _request(self) -> dict:
        patches = extract_patches(self.image, np.array([self.point.nodule.centre_lps]), self.spec)
        return {"patches": encode_patches(patches), "method": self.method, "adapter": self.adapter}

    def poll(self) -> bool:
        """Advance without waiting; True once the overlay is shown. Engine errors are raised."""
        if self.finished:
            return True
        answer = self.call.poll()
        if answer is None:
            return False
        maps, cell_px = maps_from_response(answer)
        volume = saliency_volume(maps[0], self.image, self.point.nodule.centre_lps, self.spec, cell_px, self.method)
        self.node = add_explanation(self.session.scene, volume, f"{self.point.name} {self.method}")
        show_explanation(self.session.scene, self.node, self.volume_node, opacity=self.opacity)
        return True

    def cancel(self) -> None:
        """Give up (never waits): a request being computed is stopped by ending the engine."""
        if self.finished:
            return
        self.cancelled = True
        if self.call is not None and self.call.sent:
            self.session.kill_engine()
