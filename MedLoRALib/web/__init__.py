"""``medlora web``: MedLoRA in the browser, on trame-slicer (Slicer's MRML and displayable managers).

The page drives the same logic as the Slicer module (``MedLoRALib.slicer.module_logic.ModuleLogic``
on a real MRML scene); this package only adds what a browser needs: the data-root confinement
(``paths``), the studies and points on the scene (``studies``), the page (``page``), the app that
ties them to trame's state (``app``) and the access token for non-local hosts (``access``).
"""
