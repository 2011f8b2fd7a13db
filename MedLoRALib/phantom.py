"""Kept so that ``from MedLoRALib.phantom import ...`` still works: the generator is ``MedLoRALib.synthetic``."""

from __future__ import annotations

from .synthetic import *  # noqa: F403
from .synthetic import __all__  # noqa: F401
