"""A resumable, locked record of the patients a ``cohort`` run has read.

Reading the headers of a full LIDC-IDRI download takes a while; the journal (a JSON-lines file
beside the manifest, ``.<manifest>.cohort-journal.jsonl``) gets one line per patient as soon as
it is read, so an interrupted run starts where it stopped. Its first line is a fingerprint of
the settings, the XML found and the annotation tables: when any of them changed, the journal is
started afresh. A patient is reused only while its folder holds the same files (count, bytes,
latest modification). The file is locked (``flock``) while a run holds it, so two runs never
write one manifest; the lock dies with its process. It is removed once the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from ..atomic import writing
from ..errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; the journal still resumes
    fcntl = None


def journal_path(manifest: Path) -> Path:
    return manifest.with_name(f".{manifest.name}.cohort-journal.jsonl")


def folder_state(folder: Path) -> list[int]:
    """[files, bytes, latest mtime in ns] of everything under ``folder``: changes when files do."""
    files = size = latest = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            files, size, latest = files + 1, size + st.st_size, max(latest, st.st_mtime_ns)
    return [files, size, latest]


def fingerprint(config, xml: dict[str, list[Path]], tables_files: list[Path]) -> str:
    """Settings, XML index and annotation tables in one hash: a change starts the journal afresh."""
    facts = {"version": __version__, "root": str(Path(config.root).absolute()),
             "xml_root": str(Path(config.xml_root).absolute()) if config.xml_root else None,
             "rule": config.label_rule, "min_readers": config.min_readers,
             "group_distance_mm": config.group_distance_mm,
             "xml": {uid: [str(p) for p in paths] for uid, paths in sorted(xml.items())},
             "tables": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in tables_files]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


class Journal:
    """Open with ``with Journal(manifest) as journal``; ``start`` returns the patients done."""

    def __init__(self, manifest: str | Path):
        self.path = journal_path(Path(manifest))
        self._handle = None

    def __enter__(self) -> Journal:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._handle.close()
                raise OutputError(f"another 'medlora cohort' run is writing {self.path.name[1:].split('.cohort')[0]} "
                                  f"(it holds {self.path}); wait for it to finish or choose another --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def start(self, config, xml: dict[str, list[Path]], tables_files: list[Path]) -> dict[str, tuple[list, dict]]:
        """The patients recorded under the same fingerprint: name → (folder state, result dict)."""
        print_ = fingerprint(config, xml, tables_files)
        self._handle.seek(0)
        lines = self._handle.read().splitlines()
        done: dict[str, tuple[list, dict]] = {}
        if lines and _load(lines[0]).get("fingerprint") == print_:
            for line in lines[1:]:
                entry = _load(line)  # a line cut short by a kill is skipped
                if "patient" in entry:
                    done[entry["patient"]] = (entry["state"], entry["result"])
            return done
        self._handle.seek(0)
        self._handle.truncate()
        self._write({"fingerprint": print_})
        return done

    def add(self, state: list[int], result: dict) -> None:
        self._write({"patient": result["patient"], "state": state, "result": result})

    def _write(self, entry: dict) -> None:
        with writing(self.path):
            self._handle.seek(0, os.SEEK_END)
            self._handle.write(json.dumps(entry) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def remove(self) -> None:
        """The manifest is written: the journal has done its job."""
        self.path.unlink(missing_ok=True)


def _load(line: str) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return entry if isinstance(entry, dict) else {}
