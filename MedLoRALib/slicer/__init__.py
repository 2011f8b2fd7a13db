"""3D Slicer side of MedLoRA, free of Qt and torch.

Everything here works on a real MRML scene, inside Slicer or with the ``slicer-core``
package alone (tests, scripts): volume and markups nodes become ``CTImage`` and
``Nodule`` records in LPS, patches are cut in this process with the torch-free patch
code, and the model runs in other processes (``medlora serve`` for scoring,
``medlora train`` for training) that this package launches, talks to and cancels.
Submodules are imported on use; importing this package imports nothing heavy.
"""
