"""The adapter manifest: what an adapter was trained on and how to use it.

Torch-free (3D Slicer reads it in its own process). An adapter is a folder — or a
``.zip`` of that folder's files — holding ``manifest.json`` and the weight files it
lists with their SHA-256, so a tampered or truncated file is refused. Reading and
writing those folders and zips is ``archive``'s job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

from .. import __version__
from ..atomic import sha256_bytes
from ..atomic import sha256_file as sha256_file  # re-exported: older importers hash files from here
from ..errors import AdapterError
from ..patches import PatchSpec
from ..tta import UNRECORDED_TTA, TTAError, check_tta_name

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODES = ("lora", "full", "linear")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TYPES = {"name": str, "backbone": str, "backbone_sha256": str, "random_init": bool, "patch_spec": dict,
          "mode": str, "label_names": list, "files": dict, "fusion": str}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class AdapterManifest:
    """Everything needed to use an adapter the way it was trained.

    Args:
        format_version: adapter format; a newer one than this MedLoRA reads is refused.
        name: adapter name (also its folder name in the store).
        backbone: backbone registry name (``dinov2_vits14``).
        backbone_sha256: SHA-256 of the backbone weights file, or ``"random-init"``.
        random_init: the backbone was randomly initialised; results say so.
        patch_spec: ``PatchSpec.to_dict()`` — the crop the model was trained on.
        lora: ``LoraSpec.to_dict()`` in ``lora`` mode, else ``None``.
        mode: ``lora``, ``full`` (whole network stored) or ``linear`` (head only).
        label_names: names of class 0 and class 1.
        threshold: probability at or above which the label is class 1.
        temperature: calibration; logits are divided by it (1.0 = none).
        training: training summary (data size, epochs, time, ...).
        metrics: validation metrics (AUROC, ...).
        created: ISO 8601 creation time (UTC).
        medlora_version: MedLoRA version that wrote it.
        fusion: how per-view logits are fused.
        random_init_fingerprint: SHA-256 of the seeded random backbone, when random_init.
        files: relative path → SHA-256 of every weight file.
        description: free text.
        parents: for a merged adapter (``adapters.merge``), the adapters it was made from:
            ``{"name", "version_id", "manifest_sha256"}`` each; empty otherwise. Optional:
            manifests written before it existed load unchanged.
        merge: for a merged adapter, how it was merged (method, density, rank, truncation error).
        tta: the adapter's default test-time augmentation set (``tta.TTA_SETS``), what scoring with
            TTA on uses; ``None`` in manifests written before it existed, which score with
            ``d8`` (``default_tta``) exactly as before.
    """

    format_version: int = FORMAT_VERSION
    name: str = ""
    backbone: str = ""
    backbone_sha256: str = ""
    random_init: bool = False
    patch_spec: dict = field(default_factory=lambda: PatchSpec().to_dict())
    lora: dict | None = None
    mode: str = "lora"
    label_names: list[str] = field(default_factory=lambda: ["benign", "malignant"])
    threshold: float = 0.5
    temperature: float = 1.0
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = field(default_factory=now_iso)
    medlora_version: str = __version__
    fusion: str = "mean"
    random_init_fingerprint: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    description: str = ""
    parents: list[dict] = field(default_factory=list)
    merge: dict | None = None
    tta: str | None = None

    @property
    def spec(self) -> PatchSpec:
        return PatchSpec.from_dict(self.patch_spec)

    @property
    def default_tta(self) -> str:
        """The TTA set ``tta=True`` scores with: the recorded one, else ``d8`` (older adapters)."""
        return self.tta if self.tta is not None else UNRECORDED_TTA

    @property
    def version_id(self) -> str:
        """Short content id: changes whenever any weight file changes."""
        joined = "\n".join(f"{k}:{v}" for k, v in sorted(self.files.items()))
        return sha256_bytes(joined.encode())[:12]

    def to_dict(self) -> dict:
        """All fields; ``parents``, ``merge`` and ``tta`` only when set, so an ordinary adapter's manifest
        (and its ``manifest_sha256``) is what it was before merged adapters and recorded TTA sets existed."""
        data = asdict(self)
        for key, empty in (("parents", []), ("merge", None), ("tta", None)):
            if data[key] == empty:
                del data[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> AdapterManifest:
        """Validate and build; ``source`` names the file in error messages."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: manifest must be a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise AdapterError(f"{source}: no integer format_version; this is not a MedLoRA adapter manifest")
        if version > FORMAT_VERSION:
            raise AdapterError(
                f"{source}: adapter format {version} was written by a newer MedLoRA "
                f"({data.get('medlora_version', '?')}); this MedLoRA {__version__} reads format "
                f"{FORMAT_VERSION} and older. Upgrade MedLoRA to use this adapter.")
        known = {f.name for f in fields(cls)}
        manifest = cls(**{k: v for k, v in data.items() if k in known})
        manifest.validate(source)
        return manifest

    def validate(self, source: str = "manifest") -> None:
        problems = [f"{key} must be {kind.__name__}" for key, kind in _TYPES.items()
                    if not isinstance(getattr(self, key), kind)]
        if problems:  # the checks below assume the types
            raise AdapterError(f"{source}: invalid adapter manifest: " + "; ".join(problems))
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            problems.append(f"name {self.name!r} must be a non-empty file name")
        if not self.backbone:
            problems.append("no backbone")
        if not self.backbone_sha256:
            problems.append("no backbone_sha256")
        if self.random_init != (self.backbone_sha256 == "random-init"):
            problems.append("random_init must be true exactly when backbone_sha256 is 'random-init'")
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "lora" and not isinstance(self.lora, dict):
            problems.append("mode 'lora' needs a lora spec")
        if len(self.label_names) != 2 or not all(isinstance(n, str) for n in self.label_names):
            problems.append("label_names must be two names (class 0, class 1)")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            problems.append(f"threshold {self.threshold!r} must be within [0, 1]")
        if not isinstance(self.temperature, (int, float)) or not 0.0 < float(self.temperature) < math.inf:
            problems.append(f"temperature {self.temperature!r} must be a finite number > 0")
        if not all(isinstance(k, str) and isinstance(v, str) and _SHA256.match(v) for k, v in self.files.items()):
            problems.append("files must map file names to SHA-256 hex digests")
        problems += _parent_problems(self.parents)
        if self.merge is not None and not isinstance(self.merge, dict):
            problems.append("merge must be an object or null")
        if self.fusion not in ("mean", "max"):
            problems.append(f"fusion {self.fusion!r} is not 'mean' or 'max'")
        if self.tta is not None:
            try:
                check_tta_name(self.tta, "tta")
            except TTAError as exc:
                problems.append(str(exc))
        if problems:
            raise AdapterError(f"{source}: invalid adapter manifest: " + "; ".join(problems))
        try:
            _ = self.spec
        except Exception as exc:  # PatchSpec raises PatchError or TypeError on bad dicts
            raise AdapterError(f"{source}: invalid patch_spec in manifest: {exc}") from exc


def manifest_sha256(manifest: AdapterManifest) -> str:
    """SHA-256 of the manifest as canonical JSON (sorted keys, no spaces): the same manifest gives
    the same hash whether it was read from a folder, a .zip or the engine's reply. It names one
    exact adapter, calibration and provenance included (``version_id`` names its weights only);
    the DICOM SR and a merged adapter's ``parents`` record it."""
    text = json.dumps(manifest.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_bytes(text.encode("utf-8"))


def _parent_problems(parents: object) -> list[str]:
    if not isinstance(parents, list):
        return ["parents must be a list"]
    for parent in parents:
        if not (isinstance(parent, dict) and isinstance(parent.get("name"), str)
                and isinstance(parent.get("version_id"), str)
                and isinstance(parent.get("manifest_sha256"), str) and _SHA256.match(parent["manifest_sha256"])):
            return ["parents must be objects with a name, a version_id and a manifest_sha256 (SHA-256 hex)"]
    return []


def manifest_from_bytes(data: bytes, source: str) -> AdapterManifest:
    """Parse and validate a manifest's bytes; ``source`` names it in error messages."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{source}: manifest is not valid JSON: {exc}") from exc
    return AdapterManifest.from_dict(parsed, source)
