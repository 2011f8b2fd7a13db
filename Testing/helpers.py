"""Small helpers shared by several test modules (imported as ``helpers``: pytest puts Testing/ on sys.path)."""

from __future__ import annotations

import numpy as np


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3×3 rotation about the LPS x, y or z axis."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (0, 2), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def tree_digest(*roots) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (files or folders), keyed by path.

    Bad-input tests take it before and after a command: equal digests prove that
    nothing MedLoRA did not write was changed, added or removed.
    """
    import hashlib
    from pathlib import Path

    digest = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def assert_imports_without(modules, forbidden=("torch", "timm", "peft"), *, then: str = "",
                           timeout: float = 120) -> None:
    """Import ``modules`` (and run the statements ``then``) in a fresh interpreter; fail if that
    loaded any of ``forbidden`` or one of their submodules.

    A fresh process, because this test process has long imported torch. This guards the
    modules Slicer's own Python loads (see docs/architecture.md, torch-free layers).
    """
    import json
    import subprocess
    import sys

    names = [modules] if isinstance(modules, str) else list(modules)
    code = "\n".join([
        "import importlib, json, sys",
        *(f"importlib.import_module({name!r})" for name in names),
        then,
        f"forbidden = {tuple(forbidden)!r}",
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in forbidden)))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"importing {names} failed:\n{out.stderr[-3000:]}"
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {names} pulled in {loaded}"


def tiny_model(spec, *, seed: int = 0, scale: float = 0.05, head_bias: float | None = None,
               backbone: str = "medlora_tiny", mode: str = "lora", lora=None, weights=None):
    """A small classifier as training would leave it: every trainable tensor (LoRA A and B, norm,
    head) moved off its initial value by ``scale`` × N(0, 1) drawn from ``seed``; ``head_bias``
    then fixes the head's bias (e.g. to make one adapter clearly more malignant than another).

    Random-init backbone unless ``weights`` names a weights file. Returns the model in eval mode.
    """
    import torch

    from MedLoRALib.models import LoraSpec, build_model

    model, _ = build_model(backbone, patch_spec=spec, mode=mode, lora=lora or LoraSpec(), weights=weights,
                           allow_random_init=weights is None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if scale:
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(scale * torch.randn(param.shape, generator=generator))
        if head_bias is not None:
            model.head.bias.fill_(head_bias)
    return model.eval()


def save_tiny_adapter(folder, name: str, spec, *, manifest: dict | None = None, **model_options):
    """``tiny_model(spec, **model_options)`` saved as adapter ``name`` at ``folder/name``.

    Returns ``(path, model)``; ``manifest`` adds fields to the manifest (threshold, label_names...).
    """
    from pathlib import Path

    from MedLoRALib.adapters import AdapterManifest
    from MedLoRALib.adapters.package import save_adapter

    model = tiny_model(spec, **model_options)
    path = save_adapter(model, AdapterManifest(name=name, **(manifest or {})), Path(folder) / name)
    return path, model
