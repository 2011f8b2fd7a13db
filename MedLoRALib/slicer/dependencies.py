"""Python packages MedLoRA needs inside 3D Slicer, installed on first use after one confirmation.

Nothing is installed at import time. torch comes only from the PyTorch extension
(``PyTorchUtils``), so pip never replaces Slicer's torch; Slicer's own numpy, SimpleITK,
pydicom and requests are never touched. The rest is installed with
``slicer.packaging.pip_ensure`` (Slicer ≥ 5.12: ``Base/Python/slicer/packaging.py`` at v5.12.0
and main), skipping the packages above and pinning them with a constraints file, or before
5.12 with ``slicer.util.pip_install`` (``Base/Python/slicer/util.py``, v5.4.0: a list is passed
to ``pip install`` as arguments), given ``-c constraints.txt`` that pins every one of those
packages to the version Slicer already has — so pip cannot upgrade them, torch included
(installed first, by PyTorchUtils).
When the engine runs in a separate Python (set in the module), MedLoRA does not install
into it but says what is missing there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import MedLoRAError
from .process import CREATION_FLAGS

# import name -> requirement, for Slicer's own process and for the engine/trainer process.
SLICER_PROCESS = {"scipy": "scipy>=1.10", "psutil": "psutil>=5.9", "PIL": "Pillow>=9"}
ENGINE_PROCESS = {"timm": "timm>=1.0.8", "peft": "peft>=0.13", "safetensors": "safetensors>=0.4",
                  "sklearn": "scikit-learn>=1.3", "tqdm": "tqdm>=4.60",
                  "matplotlib": "matplotlib>=3.7"}
NEVER_PIP = ("torch", "torchvision", "numpy", "SimpleITK", "pydicom", "requests")


def _missing_here(modules: dict[str, str]) -> list[str]:
    return [req for name, req in modules.items() if importlib.util.find_spec(name) is None]


def _missing_in(python: str, modules: list[str]) -> list[str]:
    """Import names missing in another interpreter (found without importing them)."""
    code = ("import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    try:
        out = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, timeout=60, check=True,
                             creationflags=CREATION_FLAGS)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MedLoRAError(f"cannot run the engine's Python {python!r}: {exc}. Set a working interpreter in "
                           "the MedLoRA module's settings.") from exc
    return json.loads(out.stdout.strip().splitlines()[-1])


def missing(engine_python: str | None = None) -> dict[str, list[str]]:
    """What is missing: ``torch`` (PyTorch extension), ``slicer`` (pip here), ``engine`` (separate Python)."""
    same_python = engine_python in (None, "", sys.executable) or Path(engine_python).name.startswith("PythonSlicer")
    result = {"torch": [], "pip": _missing_here(SLICER_PROCESS), "engine": []}
    if same_python:
        result["pip"] += _missing_here(ENGINE_PROCESS)
        if importlib.util.find_spec("torch") is None:
            result["torch"] = ["torch"]
    else:
        absent = _missing_in(engine_python, ["torch", *ENGINE_PROCESS])
        result["engine"] = ["torch" if m == "torch" else ENGINE_PROCESS[m] for m in absent]
    return result


def ensure(engine_python: str | None, confirm: Callable[[str], bool]) -> bool:
    """Install what is missing after one confirmation listing all of it; False if the user declines."""
    needed = missing(engine_python)
    if needed["engine"]:
        raise MedLoRAError(f"the engine's Python {engine_python} lacks {', '.join(needed['engine'])}: install "
                           f"them there ({engine_python} -m pip install ...) or clear the setting to use Slicer's.")
    if not needed["torch"] and not needed["pip"]:
        return True
    items = (["PyTorch (through the PyTorch extension)"] if needed["torch"] else []) + needed["pip"]
    if not confirm("MedLoRA needs these Python packages, which will now be installed:\n\n  "
                   + "\n  ".join(items) + "\n\nThis needs internet access and may take several minutes."):
        return False
    import slicer

    if needed["torch"]:
        _install_torch()
    if needed["pip"]:
        pip_ensure = _slicer_pip_ensure()
        with tempfile.TemporaryDirectory(prefix="medlora-pip-") as folder:
            constraints = write_constraints(Path(folder) / "constraints.txt")
            try:
                if pip_ensure is not None:
                    pip_ensure(pip_requirements(needed["pip"]), constraints=str(constraints),
                               skip_packages=list(NEVER_PIP), prompt_install=False, requester="MedLoRA")
                else:  # one argument per item: no quoting needed
                    slicer.util.pip_install(["-c", str(constraints), *needed["pip"]])
            except (subprocess.CalledProcessError, OSError) as exc:
                raise MedLoRAError(f"installing {', '.join(needed['pip'])} failed ({exc}). If this computer is "
                                   "offline, install them from a local wheel folder with PythonSlicer -m pip "
                                   "install --no-index --find-links FOLDER ...") from exc
    return True


def pinned_versions() -> dict[str, str]:
    """The installed version of every package pip must not touch (those present here)."""
    found = {}
    for name in NEVER_PIP:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def write_constraints(path: Path) -> Path:
    """A pip constraints file pinning Slicer's own packages (torch, numpy, SimpleITK, ...) as installed.

    torch is installed by PyTorchUtils before pip runs, so it is pinned too; if it is
    somehow absent, ``torch`` is constrained to an impossible version, so that pip fails
    with a clear message instead of downloading a torch of its choice.
    """
    pins = pinned_versions()
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    if "torch" not in pins:
        lines.append("torch==0+medlora.installs.torch.through.pytorchutils")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pip_requirements(specs: list[str]) -> list:
    """Requirement strings as ``packaging`` Requirements, which Slicer's ``pip_ensure`` takes."""
    from packaging.requirements import Requirement

    return [Requirement(spec) for spec in specs]


def _slicer_pip_ensure() -> Callable | None:
    """``slicer.packaging.pip_ensure`` (new in Slicer 5.12), or ``None`` before 5.12."""
    try:
        module = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return getattr(module, "pip_ensure", None)


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise MedLoRAError("MedLoRA needs the PyTorch extension for torch: install 'PyTorch' from the "
                           "Extensions Manager and restart Slicer.") from exc
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
        raise MedLoRAError("PyTorch could not be installed (offline?). Install it from the PyTorch module "
                           "when the computer is online.")


def requirements_file() -> Path:
    """``Resources/requirements.txt`` beside the module (built) or in the repository."""
    here = Path(__file__).resolve().parents[2]
    return here / "Resources" / "requirements.txt"


__all__ = ["ENGINE_PROCESS", "NEVER_PIP", "SLICER_PROCESS", "ensure", "missing", "pinned_versions",
           "requirements_file", "write_constraints"]
