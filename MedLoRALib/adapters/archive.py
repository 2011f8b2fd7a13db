"""Adapter folders and ``.zip`` packages on disk: read them safely, write them atomically (torch-free).

Layout of an adapter folder (or the same files in a ``.zip``):

* ``manifest.json`` — AdapterManifest, with the SHA-256 of every file below;
* ``lora/adapter_model.safetensors`` + ``lora/adapter_config.json`` — the peft LoRA
  adapter in peft's own format (``lora`` mode);
* ``head.safetensors`` — the classifier head and the trained final norm(s)
  (``lora``: head + norms; ``linear``: head);
* ``model.safetensors`` — the whole classifier (``full`` mode).

A package is someone else's file: its sizes, compression ratio, member count and member
names are checked (``ArchiveLimits``) before anything is decompressed, and every weight
file must match its SHA-256 and be a complete safetensors file before it is used or stored.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..atomic import remove, replace_dir, sha256_bytes, staging_name, writing
from ..errors import AdapterError
from .manifest import MANIFEST_NAME, AdapterManifest, manifest_from_bytes
from .tensorfile import check_safetensors

LORA_WEIGHTS = "lora/adapter_model.safetensors"
LORA_CONFIG = "lora/adapter_config.json"
HEAD_WEIGHTS = "head.safetensors"
MODEL_WEIGHTS = "model.safetensors"
REQUIRED_FILES = {"lora": (LORA_WEIGHTS, HEAD_WEIGHTS), "linear": (HEAD_WEIGHTS,), "full": (MODEL_WEIGHTS,)}


@dataclass(frozen=True)
class ArchiveLimits:
    """What a package may hold before MedLoRA decompresses any of it.

    Args:
        max_total_bytes: uncompressed size of all members together (a ``full``-mode
            ViT-g adapter is about 4.5 GB; LoRA adapters about 1 MB).
        max_ratio: uncompressed / compressed size of any member over ``ratio_floor_bytes``
            (float weights compress about 1.1×; zip bombs 1000×).
        ratio_floor_bytes: members smaller than this are not ratio-checked (small JSON).
        max_members: files in the package (an adapter has at most four).
    """

    max_total_bytes: int = 8 << 30
    max_ratio: float = 50.0
    ratio_floor_bytes: int = 1 << 20
    max_members: int = 64


DEFAULT_LIMITS = ArchiveLimits()


@dataclass
class AdapterFiles:
    """A verified adapter: its manifest and the bytes of every file it lists."""

    manifest: AdapterManifest
    contents: dict[str, bytes]
    source: str


def safe_member(name: str) -> bool:
    """A relative name inside the package: no absolute path, ``..``, backslash or drive."""
    path = PurePosixPath(name)
    return (bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name
            and ":" not in name)


def _check_zip(path: Path, archive: zipfile.ZipFile, limits: ArchiveLimits) -> None:
    members = archive.infolist()
    if len(members) > limits.max_members:
        raise AdapterError(f"{path} holds {len(members)} files; an adapter package holds at most "
                           f"{limits.max_members}. Not a MedLoRA adapter: refused without unpacking.")
    names = [m.filename for m in members]
    bad = [n for n in names if not safe_member(n)]
    if bad:
        raise AdapterError(f"{path} holds unsafe file names {bad[:3]} (absolute or '..' paths): refused")
    if len(set(names)) != len(names):
        raise AdapterError(f"{path} holds the same file name twice: refused (ambiguous package)")
    total = sum(m.file_size for m in members)
    if total > limits.max_total_bytes:
        raise AdapterError(f"{path} would unpack to {total / 2**30:.1f} GiB, over the limit of "
                           f"{limits.max_total_bytes / 2**30:.1f} GiB for an adapter: refused without unpacking "
                           "(a zip bomb, or not an adapter).")
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise AdapterError(f"{path}: {member.filename} would unpack {ratio:.0f}× its packed size "
                               f"({member.file_size / 2**20:.0f} MiB); adapter weights barely compress "
                               f"(limit {limits.max_ratio:g}×). Refused without unpacking: a zip bomb?")


def _open_zip(path: Path, limits: ArchiveLimits) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise AdapterError(f"{path} is not a readable zip archive ({exc}): damaged or incomplete?") from exc
    try:
        _check_zip(path, archive, limits)
    except BaseException:
        archive.close()
        raise
    return archive


def _read_member(path: Path, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        # CRC mismatch, truncated data, unsupported compression
        raise AdapterError(f"{path}: {name} cannot be unpacked ({exc}): the package is damaged") from exc


def _not_an_adapter(path: Path) -> AdapterError:
    if path.suffix.lower() == ".zip":
        return AdapterError(f"{path} is named .zip but is not a zip archive (damaged or incomplete download?); "
                            "an adapter is a .zip package or a folder holding manifest.json")
    return AdapterError(f"{path} is not an adapter: give a .zip adapter package, an adapter folder, or its "
                        f"{MANIFEST_NAME}")


def read_manifest(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> AdapterManifest:
    """The manifest of an adapter folder, ``.zip`` or ``manifest.json`` (weights not checked)."""
    path = Path(path).expanduser()
    folder = path.is_dir()
    if folder:
        path = path / MANIFEST_NAME
    if not path.exists():
        if folder:
            raise AdapterError(f"no adapter at {path.parent}: the folder has no {MANIFEST_NAME}, so it is not "
                               "a MedLoRA adapter")
        raise AdapterError(f"no adapter at {path}: expected an adapter folder or .zip with {MANIFEST_NAME}")
    if zipfile.is_zipfile(path):
        with _open_zip(path, limits) as archive:
            try:
                data = _read_member(path, archive, MANIFEST_NAME)
            except KeyError as exc:
                raise AdapterError(f"{path} is a zip without {MANIFEST_NAME}: not a MedLoRA adapter") from exc
        return manifest_from_bytes(data, f"{path}:{MANIFEST_NAME}")
    if path.name != MANIFEST_NAME and path.suffix.lower() != ".json":
        raise _not_an_adapter(path)
    if path.stat().st_size > limits.ratio_floor_bytes:
        raise AdapterError(f"{path} is {path.stat().st_size} bytes: too large for an adapter manifest")
    return manifest_from_bytes(path.read_bytes(), str(path))


def _read_folder_file(folder: Path, name: str, budget: int) -> bytes:
    target = folder / name
    size = target.stat().st_size
    if size > budget:
        raise AdapterError(f"adapter {folder}: {name} is {size / 2**30:.1f} GiB, over the size limit for an adapter")
    return target.read_bytes()


def read_adapter_files(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS
                       ) -> tuple[AdapterManifest, dict[str, bytes]]:
    """Manifest plus the bytes of every file it lists, each checked against its SHA-256."""
    path = Path(path).expanduser()
    manifest = read_manifest(path, limits)
    unsafe = [name for name in manifest.files if not safe_member(name)]
    if unsafe:
        raise AdapterError(f"{path}: manifest lists an unsafe file name {unsafe[0]!r}")
    contents: dict[str, bytes] = {}
    budget = limits.max_total_bytes
    archive = None if path.is_dir() else _open_zip(path, limits)
    try:
        for name, expected in manifest.files.items():
            try:
                data = (_read_folder_file(path, name, budget) if archive is None
                        else _read_member(path, archive, name))
            except (OSError, KeyError) as exc:
                raise AdapterError(f"adapter {path} is incomplete: {name} is missing ({exc})") from exc
            budget -= len(data)
            if sha256_bytes(data) != expected:
                raise AdapterError(
                    f"adapter {path}: {name} does not match the SHA-256 recorded in its manifest — the file "
                    "was changed or damaged after the adapter was saved. Get a fresh copy of the adapter.")
            contents[name] = data
    finally:
        if archive is not None:
            archive.close()
    return manifest, contents


def read_checked(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> AdapterFiles:
    """A verified adapter: hashes match, every file its mode needs is there and every
    ``.safetensors`` is complete (checked without torch, so import/export can refuse a
    damaged adapter in Slicer's own process)."""
    manifest, contents = read_adapter_files(path, limits)
    missing = [name for name in REQUIRED_FILES[manifest.mode] if name not in contents]
    if missing:
        raise AdapterError(f"adapter {path} lacks {', '.join(missing)} needed in {manifest.mode!r} mode")
    for name, data in contents.items():
        if name.endswith(".safetensors"):
            check_safetensors(data, f"adapter {path}: {name}")
    return AdapterFiles(manifest, contents, str(path))


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is an adapter folder or ``.zip`` with a valid MedLoRA manifest."""
    try:
        read_manifest(path)
    except AdapterError:
        return False
    return True


def _write_zip(tmp: Path, manifest: AdapterManifest, contents: dict[str, bytes]) -> None:
    with open(tmp, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in sorted(contents.items()):
                archive.writestr(name, data)
            archive.writestr(MANIFEST_NAME, manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())


def _write_folder(tmp: Path, manifest: AdapterManifest, contents: dict[str, bytes]) -> None:
    tmp.mkdir()
    for name, data in contents.items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")  # last: marks it complete


def write_adapter(manifest: AdapterManifest, contents: dict[str, bytes], dest: str | Path) -> Path:
    """Write an adapter folder (or ``.zip`` when ``dest`` ends so) atomically.

    ``manifest.files`` is set to the SHA-256 of ``contents``. Everything goes to a hidden
    sibling (``.<name>.tmp-<pid>-…``) first and is renamed into place, so ``dest`` is either
    the old adapter or the complete new one — never a half-written folder that looks valid.
    Whether ``dest`` may be replaced is the caller's decision.
    """
    dest = Path(dest).expanduser()
    for name in contents:
        if not safe_member(name) or name == MANIFEST_NAME:
            raise AdapterError(f"cannot write adapter file {name!r}: unsafe or reserved name")
    manifest.files = {name: sha256_bytes(data) for name, data in sorted(contents.items())}
    manifest.validate(str(dest))
    zipped = dest.suffix.lower() == ".zip"
    if dest.exists() and dest.is_dir() == zipped:
        kind = "folder" if zipped else "file"
        raise AdapterError(f"cannot write adapter {dest}: a {kind} of that name exists")
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(dest)
    try:
        with writing(dest):
            if zipped:
                _write_zip(tmp, manifest, contents)
                os.replace(tmp, dest)
            else:
                _write_folder(tmp, manifest, contents)
                replace_dir(tmp, dest)
    finally:
        remove(tmp)
    return dest
