"""Paths the page may open: only under the data root, and uploads only up to a size cap.

A name typed in the page is resolved against the data root with every symlink followed;
it must stay inside the root (no ``..``, no absolute path elsewhere, no link pointing out).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import MedLoRAError


class WebInputError(MedLoRAError):
    """A request from the page that is refused: a path outside the data root, an upload too large."""


@dataclass(frozen=True)
class DataRoot:
    """The folder the page may read from (and upload into ``uploads/`` under ``upload_dir``)."""

    root: Path
    max_upload_bytes: int = 1 << 30

    @classmethod
    def at(cls, folder: str | os.PathLike, max_upload_bytes: int = 1 << 30) -> DataRoot:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise WebInputError(f"--data-root {folder}: no such folder; give the folder holding your CTs.")
        return cls(root=root.resolve(), max_upload_bytes=int(max_upload_bytes))

    def resolve(self, name: str) -> Path:
        """``name`` (relative to the root, or absolute inside it) as a real path inside the root."""
        text = (name or "").strip()
        if not text:
            raise WebInputError("type a path under the data root (a DICOM folder, .nrrd or .nii.gz).")
        if ".." in PurePosixPath(text.replace("\\", "/")).parts:
            raise WebInputError(f"'{text}': '..' is not allowed; give a path inside the data root {self.root}.")
        candidate = Path(text) if os.path.isabs(text) else self.root / text
        real = candidate.resolve()
        if real != self.root and self.root not in real.parents:
            raise WebInputError(f"'{text}' lies outside the data root {self.root} (or links out of it): "
                                "only files under the data root can be opened.")
        if not real.exists():
            raise WebInputError(f"'{text}': no such file or folder under the data root {self.root}.")
        return real

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    def check_upload(self, name: str, size: int) -> str:
        """The upload's safe file name; refuses it when larger than the cap."""
        if size > self.max_upload_bytes:
            raise WebInputError(f"upload '{name}' is {size / 2**20:.1f} MiB, more than the limit of "
                                f"{self.max_upload_bytes / 2**20:.1f} MiB (medlora web --max-upload-mb); "
                                "put large studies under the data root and open them by path.")
        safe = PurePosixPath(str(name).replace("\\", "/")).name
        if safe in ("", ".", ".."):
            raise WebInputError(f"upload '{name}': not a file name.")
        return safe
