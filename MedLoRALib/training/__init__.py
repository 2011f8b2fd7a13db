"""Training LoRA adapters from local annotations.

Modules are kept apart so the torch-free ones (``manifest``, ``splits``, ``metrics``,
``reports``, ``progress``, ``augment``) can be used by ``medlora dataset check`` and by
the Slicer module without importing torch. ``dataset``, ``checkpoint`` and ``trainer``
need torch; import them explicitly (``from MedLoRALib.training.trainer import train``).
"""
