"""Errors a user can act on.

Every error MedLoRA raises on bad input is a ``MedLoRAError``: its message says what
was wrong, where (file, point, series) and what to do. The command line prints the
message without a traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class MedLoRAError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class CTLoadError(MedLoRAError):
    """A CT could not be read, or would be read wrongly (missing slices, tilt, ...)."""


class AnnotationError(MedLoRAError):
    """An annotation file is unreadable, empty, or points outside the image."""


class PatchError(MedLoRAError):
    """Patches cannot be cut as asked (bad spec, point outside the volume)."""


class AdapterError(MedLoRAError):
    """An adapter package is missing, tampered with, or made for another backbone."""


class ModelError(MedLoRAError):
    """A backbone cannot be created as asked (unknown name, no weights)."""


class DatasetError(MedLoRAError):
    """A training manifest cannot be used (missing files, one class, ...)."""


class OutputError(MedLoRAError, OSError):
    """An output cannot be written: the disk is full, the folder is read-only, a file stands
    where a folder is needed, ...

    Also an ``OSError``, so code that handles failed writes as such keeps working.
    """

    def __str__(self) -> str:  # OSError would format "[Errno N] strerror: filename" instead
        return str(self.args[0]) if self.args else ""


# errno -> (what happened, what to do); the facts every "cannot write" message is built from
_DISK_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS"}
_WRITE_PROBLEMS = {
    "ENOSPC": ("the disk is full (no space left on device)", "free some space or write to another disk"),
    "EDQUOT": ("the disk is full for you: your disk quota is exceeded", "free some space or write to another disk"),
    "EROFS": ("it is on a read-only file system", "write to a folder on a writable disk"),
    "EACCES": ("permission denied", "write to a folder you may write to, or change its permissions"),
    "EPERM": ("operation not permitted", "write to a folder you may write to, or change its permissions"),
    "EFBIG": ("a file grew beyond the largest file allowed here (a file-size limit such as `ulimit -f`, "
              "or the file system's maximum)", "raise the limit or write to another disk"),
    "EEXIST": ("it exists as a file where a folder is needed", "choose another path, or move that file away"),
    "EISDIR": ("it is a folder where a file is needed", "give a file name, not a folder"),
    "ENAMETOOLONG": ("the path is too long for this file system", "choose a shorter path"),
    "ENOENT": ("no such file or folder", "check the path"),
}
_WRITE_ONLY = _DISK_ERRNOS | {"EFBIG"}


def os_error_reason(exc: OSError) -> str:
    """What went wrong with a failed write, in words (the table below), with its file if known."""
    what = _WRITE_PROBLEMS.get(errno.errorcode.get(exc.errno or 0, ""), (exc.strerror or str(exc), ""))[0]
    return f"{what} ({exc.filename})" if exc.filename else what


def explain_os_error(exc: OSError, path: object = None, option: str = "", writing: bool = True) -> OutputError:
    """One-line OutputError for an OSError: what happened, where, what to do.

    ``path`` names the output when the OSError carries no file name (PIL and ``write()``
    calls raise ENOSPC without one); ``option`` (e.g. ``--out``) is named in the advice;
    ``writing`` says whether the path is known to be an output.
    """
    name = errno.errorcode.get(exc.errno or 0, "")
    known = exc.filename if exc.filename is not None else path
    where = Path(os.fsdecode(known) if isinstance(known, (str, bytes, os.PathLike)) else "")
    if name in _DISK_ERRNOS and where.name.startswith("."):
        where = where.parent  # a temporary file beside the output: name its folder
    what, todo = _WRITE_PROBLEMS.get(name, (exc.strerror or str(exc), "check the path and the disk"))
    if name == "ENOTDIR":  # name the file that stands where a folder is needed
        blocker = next((p for p in where.parents if p.is_file()), None)
        what = f"{blocker or 'part of it'} is a file where a folder is needed"
        todo = "choose another path, or move that file away"
    elif name == "EEXIST" and where.is_dir():
        what, todo = "it already exists", "choose another path"
    elif name in ("EACCES", "EPERM") and not writing:
        todo = "check that you may read it"
    if option and name != "EFBIG":
        todo = f"{todo} ({option})"
    verb = "write" if writing or name in _WRITE_ONLY else "use"
    target = str(where) if str(where) not in ("", ".") else "its output"
    return OutputError(f"cannot {verb} {target}: {what}; {todo}")


def disk_problem(paths, size_limit: bool = True) -> str:
    """Why writing under any of ``paths`` may have failed for lack of space or permission, or "".

    For failures whose errno is lost (SimpleITK and torch raise RuntimeError): looks at the
    file system holding each path (read-only? nearly full?) and, with ``size_limit``, at a
    file-size limit (``ulimit -f``) set on this process.
    """
    for path in paths:
        existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), None)
        if existing is None:
            continue
        try:
            fs = os.statvfs(existing)
        except (OSError, AttributeError):  # AttributeError: Windows has no statvfs
            continue
        if fs.f_flag & getattr(os, "ST_RDONLY", 1):
            return f"{existing} is on a read-only file system; write to a folder on a writable disk"
        free = fs.f_bavail * fs.f_frsize
        if free < min(16 << 20, fs.f_blocks * fs.f_frsize // 20):
            return (f"the disk holding {existing} is full ({free // 1024} KiB free); free some space or write "
                    "to another disk")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if size_limit else resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return ""
    if limit != resource.RLIM_INFINITY:
        return f"this process may write files of at most {limit} bytes (`ulimit -f`); raise the limit"
    return ""
