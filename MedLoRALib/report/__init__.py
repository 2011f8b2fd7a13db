"""Reports of MedLoRA's results in formats other tools read.

``report.sr``: a DICOM Structured Report (TID 1500 Measurement Report) of the malignancy scores of
one study, for PACS, OHIF, dcmqi and highdicom. Torch-free; highdicom is imported only when a
report is written (3D Slicer bundles it from 5.12 on).
"""
