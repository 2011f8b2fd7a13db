"""Where the model looked: saliency on the adapter's views, mapped back into the CT as a volume.

``saliency`` (torch) computes attention rollout and gradient × input on the planes an
adapter reads; ``volume`` (torch-free) puts those plane maps back into the CT's own LPS
grid with one interpolation and writes NRRD; ``slicer_overlay`` (torch-free, MRML) shows
such a volume as a coloured foreground layer over the CT in Slicer's slice views.
This package file imports nothing, so Slicer's process can load the torch-free parts.
"""
