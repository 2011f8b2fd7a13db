"""Errors a user can act on.

Every error MedLoRA raises on bad input is a ``MedLoRAError``: its message says what
was wrong, where (file, point, series) and what to do. The command line prints the
message without a traceback.
"""


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
    """An output cannot be written (full disk, read-only folder, no permission); the previous one is intact.

    Also an ``OSError``, so code that handles failed writes as such keeps working.
    """

    def __str__(self) -> str:  # OSError would format "[Errno N] strerror: filename" instead
        return str(self.args[0]) if self.args else ""
