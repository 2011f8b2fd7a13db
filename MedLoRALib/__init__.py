"""MedLoRA: LoRA-adapted Vision Transformers for lung nodule malignancy.

The I/O, geometry, annotation and patch modules import numpy, SciPy and SimpleITK
only, so 3D Slicer's process can use them; everything that needs torch lives in
``MedLoRALib.models``, ``MedLoRALib.engine`` and ``MedLoRALib.training`` and runs in
the ``medlora serve`` / ``medlora train`` processes.
"""

__version__ = "0.1.0"
