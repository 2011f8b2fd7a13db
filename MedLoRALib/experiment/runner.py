"""The experiment from start to report: data and folds checked, this process's jobs, the wait, the report.

Processes: ``RANK`` and ``WORLD_SIZE`` (set by ``torchrun``, or by hand) say which process this
is. Rank ``r`` trains jobs ``r, r + W, r + 2W, ...`` of the fold-major job list, then helps with
jobs nobody has started (taken from the end, so helpers meet the owner in the middle); a job is
claimed by locking its folder (``locks.OutputLock``), so no two processes ever train the same
one. Rank 0 holds the lock of the whole folder, prepares it, and after its own jobs waits for
every ``result.json`` — training any job whose process died — then writes the report. No
``torch.distributed`` is needed: the processes meet only through the folder.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import DatasetError, MedLoRAError
from ..locks import OutputBusyError, OutputLock
from .config import ExperimentConfig
from .folder import FORMAT, JOBS, STATE_NAME, inspect_folder, prepare_folder, read_state
from .jobs import Job, all_jobs, read_result, run_job, warm_up


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        try:
            world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        except ValueError as exc:
            raise MedLoRAError(f"RANK and WORLD_SIZE must be whole numbers ({exc})") from None
        if world < 1 or not 0 <= rank < world:
            raise MedLoRAError(f"RANK={rank} does not fit WORLD_SIZE={world}: ranks run from 0 to WORLD_SIZE-1")
        return cls(rank, world)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_cohort(config: ExperimentConfig):
    """The manifest's nodules with their volumes cropped to what a patch can reach (loaded once)."""
    from ..training.augment import AugmentConfig, patch_reach_mm
    from ..training.manifest import check_training_set

    if not config.manifest.is_file():
        raise DatasetError(f"manifest not found: {config.manifest} (make one with 'medlora cohort lidc --root DIR "
                           "--out manifest.csv', or give the path of an existing manifest)")
    return check_training_set(config.manifest, reach_mm=patch_reach_mm(config.patch_spec(), AugmentConfig()))


def make_folds(data, folds: int, seed: int) -> tuple[list, dict[str, list[str]]]:
    """Patient-level stratified folds (``training.splits.kfold_splits``) and the patients of each.

    Refused before any training, with what is missing: fewer patients than folds, or fewer
    patients with a malignant (or a benign) nodule than folds — then some fold would validate on
    one class only, where AUC is undefined.
    """
    from ..training.splits import kfold_splits

    pids, labels = data.patient_ids, data.labels
    patients = sorted(set(pids))
    if len(patients) < folds:
        raise DatasetError(f"{data.manifest}: {len(patients)} patients for {folds} folds; each fold validates on "
                           f"different patients, so use --folds {max(2, len(patients))} or fewer, or add patients")
    for label, name in ((1, "malignant"), (0, "benign")):
        having = sorted({p for p, y in zip(pids, labels) if y == label})
        if len(having) < folds:
            raise DatasetError(
                f"{data.manifest}: only {len(having)} patient(s) have a {name} nodule "
                f"({', '.join(having[:5]) or 'none'}), so with {folds} folds by patient at least one fold would "
                f"validate on one class only (AUC undefined there). Use --folds {max(2, len(having))} or fewer, "
                "or add patients.")
    splits = kfold_splits(pids, labels, folds, seed)  # also refuses a fold that still came out with one class
    members = {s.name: sorted({pids[i] for i in s.val}) for s in splits}
    return splits, members


def _state(config: ExperimentConfig, data, members: dict) -> dict:
    from ..training.checkpoint import data_fingerprint

    summary = data.summary()
    return {"format": FORMAT, "version": __version__, "identity": {**config.identity(),
                                                                   "data": data_fingerprint(data.samples)},
            "folds": members, "arms": list(config.arms),
            "cohort": {k: summary[k] for k in ("nodules", "benign", "malignant", "patients", "images", "excluded")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _inputs(config: ExperimentConfig, data) -> list[Path]:
    return [config.manifest, *(Path(k.split("#")[0]) for k in data.images)]


class JobRunner:
    """Claims and trains jobs of one experiment folder; prints one line per job."""

    def __init__(self, config: ExperimentConfig, data, splits: list, jobs: list[Job], procs: Processes,
                 say: Callable[[str], None]) -> None:
        self.config, self.data, self.procs, self.say = config, data, procs, say
        self.splits = {k + 1: s for k, s in enumerate(splits)}
        self.jobs = jobs
        self.jobs_dir = config.out / JOBS
        self.trained: list[str] = []
        self.warm = False

    def done(self, job: Job) -> bool:
        return read_result(self.jobs_dir / job.name) is not None

    def _label(self, job: Job) -> str:
        n = self.jobs.index(job) + 1
        who = f"[rank {self.procs.rank}] " if self.procs.world > 1 else ""
        return f"{who}[{n}/{len(self.jobs)}] {job.name}:"

    def try_run(self, job: Job, *, announce_skip: bool = False) -> str:
        """Train ``job`` unless finished or claimed: returns ``done``, ``busy`` or ``trained``."""
        if self.done(job):
            if announce_skip:
                self.say(f"{self._label(job)} finished earlier, skipped")
            return "done"
        try:
            lock = OutputLock(self.jobs_dir / job.name, activity="trained by medlora experiment").acquire()
        except OutputBusyError:
            return "busy"
        try:
            if self.done(job):  # finished while we looked
                return "done"
            if not self.warm:
                warm_up(self.config)
                self.warm = True
            self.say(f"{self._label(job)} training")
            record = run_job(self.config, job, self.splits[job.fold], self.data, self.jobs_dir / job.name,
                             self._label(job))
            auc = _auc(record)
            self.say(f"{self._label(job)} done in {record['wall_s']:.1f} s, fold AUC {auc}")
            self.trained.append(job.name)
            return "trained"
        finally:
            lock.release()

    def run_mine(self) -> None:
        rank, world = self.procs.rank, self.procs.world
        mine = self.jobs[rank::world]
        for job in mine:
            self.try_run(job, announce_skip=True)
        for job in reversed([j for j in self.jobs if j not in mine]):  # help with what nobody took yet
            self.try_run(job)

    def wait_for_all(self) -> None:
        """Until every job has its result: train the unclaimed ones, wait for the claimed ones."""
        waiting_for: set[str] = set()
        while True:
            states = {job.name: self.try_run(job) for job in self.jobs}
            busy = {name for name, state in states.items() if state == "busy"}
            if "trained" in states.values():
                continue  # look again at once: others may have finished meanwhile
            if not busy:
                return
            if busy != waiting_for:
                self.say(f"waiting for {len(busy)} job(s) other processes are training: {', '.join(sorted(busy))}")
                waiting_for = busy
            time.sleep(self.config.poll_s)


def _auc(record: dict) -> str:
    auc = record["metrics"]["auc"]
    return "n/a" if auc is None else f"{auc:.3f}"


def run_experiment(config: ExperimentConfig, *, procs: Processes | None = None,
                   say: Callable[[str], None] = _say) -> Path | None:
    """Run (or continue) ``config``; returns the report folder on rank 0, ``None`` on the other ranks.

    Raises MedLoRAError for bad input, ``jobs.JobStopped`` when a job was stopped on request.
    """
    procs = procs or Processes.from_env()
    if config.overwrite and procs.world > 1:
        raise MedLoRAError("--overwrite cannot be combined with several processes (they would race to clear the "
                           f"folder): remove {config.out} yourself, or run once without torchrun, or name a new --out")
    data = load_cohort(config)
    splits, members = make_folds(data, config.folds, config.seed)
    state = _state(config, data, members)
    jobs = all_jobs(config.folds, config.arms)
    runner = JobRunner(config, data, splits, jobs, procs, say)
    if procs.rank != 0:  # rank 0 checks and prepares the folder; a helper only waits for it to be ready
        say(f"[rank {procs.rank}] experiment {config.out}: process {procs.rank} of {procs.world}")
        _wait_for_state(config.out, state, say)
        runner.run_mine()
        return None
    with OutputLock(config.out, activity="written by medlora experiment"):
        found = inspect_folder(config.out, state["identity"], members, resume=config.resume,
                               overwrite=config.overwrite, inputs=_inputs(config, data))
        say(f"experiment {config.out}: {len(jobs)} jobs ({config.folds} folds × {', '.join(config.arms)}) on "
            f"{state['cohort']['nodules']} nodules of {state['cohort']['patients']} patients"
            + (f"; {procs.world} processes" if procs.world > 1 else "")
            + ("; continuing the earlier run" if found.action == "resume" else ""))
        prepare_folder(config.out, found, state)
        runner.run_mine()
        runner.wait_for_all()
        from .report import write_report

        report = write_report(config, data, members, jobs)
    say(f"report: {report / 'report.md'}")
    return report


def _wait_for_state(out: Path, state: dict, say: Callable[[str], None], timeout_s: float = 600.0) -> None:
    """A helper rank starts once rank 0 has prepared the folder for this very experiment."""
    start, told = time.monotonic(), False
    while True:
        saved = read_state(out)
        if saved and saved.get("identity") == state["identity"] and saved.get("folds") == state["folds"]:
            return
        if time.monotonic() - start > timeout_s:
            raise MedLoRAError(f"rank 0 has not prepared {out / STATE_NAME} for this experiment within "
                               f"{timeout_s:.0f} s; is rank 0 running with the same options?")
        if not told:
            say(f"waiting for rank 0 to prepare {out}")
            told = True
        time.sleep(0.2)

