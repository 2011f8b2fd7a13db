"""The adapter manifest: what an adapter was trained on and how to use it.

Torch-free (3D Slicer reads it in its own process). An adapter is a folder — or a
``.zip`` of that folder's files — holding ``manifest.json`` and the weight files it
lists with their SHA-256, so a tampered or truncated file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from .. import __version__
from ..atomic import replace_dir
from ..errors import AdapterError
from ..patches import PatchSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODES = ("lora", "full", "linear")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (backbone weights can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    @property
    def spec(self) -> PatchSpec:
        return PatchSpec.from_dict(self.patch_spec)

    @property
    def version_id(self) -> str:
        """Short content id: changes whenever any weight file changes."""
        joined = "\n".join(f"{k}:{v}" for k, v in sorted(self.files.items()))
        return sha256_bytes(joined.encode())[:12]

    def to_dict(self) -> dict:
        return asdict(self)

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
        problems = []
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
        if not (isinstance(self.label_names, list) and len(self.label_names) == 2):
            problems.append("label_names must be two names (class 0, class 1)")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            problems.append(f"threshold {self.threshold!r} must be within [0, 1]")
        if not isinstance(self.temperature, (int, float)) or not float(self.temperature) > 0.0:
            problems.append(f"temperature {self.temperature!r} must be > 0")
        if not isinstance(self.files, dict):
            problems.append("files must map file names to SHA-256")
        if problems:
            raise AdapterError(f"{source}: invalid adapter manifest: " + "; ".join(problems))
        try:
            self.spec
        except Exception as exc:  # PatchSpec raises PatchError or TypeError on bad dicts
            raise AdapterError(f"{source}: invalid patch_spec in manifest: {exc}") from exc


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name


def _manifest_from_bytes(data: bytes, source: str) -> AdapterManifest:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{source}: manifest is not valid JSON: {exc}") from exc
    return AdapterManifest.from_dict(parsed, source)


def read_manifest(path: str | Path) -> AdapterManifest:
    """The manifest of an adapter folder, ``.zip`` or ``manifest.json`` (weights not checked)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise AdapterError(f"no adapter at {path}: expected an adapter folder or .zip with {MANIFEST_NAME}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return _manifest_from_bytes(archive.read(MANIFEST_NAME), f"{path}:{MANIFEST_NAME}")
        except KeyError as exc:
            raise AdapterError(f"{path} is a zip without {MANIFEST_NAME}: not a MedLoRA adapter") from exc
    return _manifest_from_bytes(path.read_bytes(), str(path))


def read_adapter_files(path: str | Path) -> tuple[AdapterManifest, dict[str, bytes]]:
    """Manifest plus the bytes of every file it lists, each checked against its SHA-256."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    contents: dict[str, bytes] = {}
    for name, expected in manifest.files.items():
        if not _safe_member(name):
            raise AdapterError(f"{path}: manifest lists an unsafe file name {name!r}")
        try:
            if path.is_dir():
                data = (path / name).read_bytes()
            else:
                with zipfile.ZipFile(path) as archive:
                    data = archive.read(name)
        except (OSError, KeyError) as exc:
            raise AdapterError(f"adapter {path} is incomplete: {name} is missing ({exc})") from exc
        if sha256_bytes(data) != expected:
            raise AdapterError(
                f"adapter {path}: {name} does not match the SHA-256 recorded in its manifest — the file "
                "was changed or damaged after the adapter was saved. Get a fresh copy of the adapter.")
        contents[name] = data
    return manifest, contents


def write_adapter(manifest: AdapterManifest, contents: dict[str, bytes], dest: str | Path) -> Path:
    """Write an adapter folder (or ``.zip`` when ``dest`` ends so) atomically.

    ``manifest.files`` is set to the SHA-256 of ``contents``. Everything goes to a
    temporary sibling first and is renamed into place, so ``dest`` is either the old
    adapter or the complete new one — never a half-written folder that looks valid.
    """
    dest = Path(dest).expanduser()
    for name in contents:
        if not _safe_member(name) or name == MANIFEST_NAME:
            raise AdapterError(f"cannot write adapter file {name!r}: unsafe or reserved name")
    manifest.files = {name: sha256_bytes(data) for name, data in sorted(contents.items())}
    manifest.validate(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = dest.parent / f".{dest.name}.tmp-{token}"
    try:
        if dest.suffix.lower() == ".zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name, data in sorted(contents.items()):
                    archive.writestr(name, data)
                archive.writestr(MANIFEST_NAME, manifest.to_json())
            os.replace(tmp, dest)
            return dest
        for name, data in contents.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        if dest.exists() and not dest.is_dir():
            raise AdapterError(f"cannot write adapter folder {dest}: a file of that name exists")
        replace_dir(tmp, dest)
        return dest
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


