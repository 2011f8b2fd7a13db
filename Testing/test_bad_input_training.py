"""``medlora train`` with bad options and dangerous outputs: clear errors, and nothing lost.

Each case checks the exit code, the message's key words, no traceback, and (with
``tree_digest``) that no file MedLoRA did not write was changed. Two trainings of one output
are tried with real processes; disk-full and read-only outputs with a real tmpfs (root only).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_digest
from test_training import REPO, SPEC_ARGS, TINY, adapter_tensors, config, events_of, write_sphere_cohort

from MedLoRALib.cli import main
from MedLoRALib.geometry import Geometry
from MedLoRALib.image import CTImage
from MedLoRALib.locks import OutputBusyError, OutputLock
from MedLoRALib.outputs import MARKER_NAME, read_marker, write_marker
from MedLoRALib.synthetic import write_dicom_series
from MedLoRALib.training import trainer as T

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FAST = [*TINY, *SPEC_ARGS, "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.34", "--progress", "none"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_sphere_cohort(tmp_path_factory.mktemp("spheres"), n_cases=6)


def train_cli(cohort: Path, out: Path, *extra: str) -> int:
    return main(["train", "--manifest", str(cohort), "--out", str(out), *FAST, *extra])


def dicom_folder(folder: Path) -> Path:
    image = CTImage(np.full((4, 8, 8), -800, dtype=np.int16), Geometry(size=(8, 8, 4), spacing=(1.0, 1.0, 2.0), origin_lps=(0.0, 0.0, 0.0)))
    write_dicom_series(image, folder)
    return folder


# --- --overwrite replaces only what MedLoRA wrote -----------------------------------------------


@pytest.mark.parametrize("flags", [["--overwrite"], ["--overwrite", "--resume"], []])
def test_overwrite_refuses_a_folder_medlora_did_not_write(cohort, tmp_path, capsys, flags):
    study = dicom_folder(tmp_path / "study")
    before = tree_digest(study, cohort.parent)
    assert train_cli(cohort, study, *flags) == 2
    err = capsys.readouterr().err
    assert "was not written by MedLoRA" in err and MARKER_NAME in err and "Traceback" not in err
    assert tree_digest(study, cohort.parent) == before


def test_overwrite_never_deletes_the_manifests_folder_even_when_marked(cohort, tmp_path, capsys):
    before = tree_digest(cohort.parent)
    write_marker(cohort.parent, "adapter")  # even a folder that claims to be MedLoRA's
    try:
        assert train_cli(cohort, cohort.parent, "--overwrite") == 2
    finally:
        (cohort.parent / MARKER_NAME).unlink()
    err = capsys.readouterr().err
    assert "will not replace this folder because it holds" in err and "an input of this run" in err
    assert tree_digest(cohort.parent) == before


@pytest.mark.parametrize("where", ["dot", "dotdot", "home", "parent_of_cwd"])
def test_out_naming_the_current_or_home_folder_is_a_clear_error(cohort, tmp_path, monkeypatch, capsys, where):
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home, work):
        folder.mkdir()
        (folder / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out, expected = {"dot": (".", "give it a name, e.g. --out my_adapter"),
                     "dotdot": ("..", "give it a name, e.g. --out my_adapter"),
                     "home": (str(home), "because it is your home folder"),
                     "parent_of_cwd": (str(tmp_path), f"because it holds the current folder {work}")}[where]
    before = tree_digest(tmp_path)
    assert main(["train", "--manifest", str(cohort), "--out", out, *FAST, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert tree_digest(tmp_path) == before


def test_checkpoint_dir_that_is_not_medloras_is_refused(cohort, tmp_path, capsys):
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.docx").write_bytes(b"years of work")
    before = tree_digest(documents)
    assert train_cli(cohort, tmp_path / "adapter", "--checkpoint-dir", str(documents), "--overwrite") == 2
    assert f"--checkpoint-dir {documents} was not written by MedLoRA" in capsys.readouterr().err
    assert tree_digest(documents) == before and not (tmp_path / "adapter").exists()
    beside = tmp_path / "adapter.checkpoint"  # the default checkpoint folder, made by somebody else
    shutil.copytree(documents, beside)
    assert train_cli(cohort, tmp_path / "adapter", "--overwrite") == 2
    assert f"the checkpoint folder {beside} was not written by MedLoRA" in capsys.readouterr().err
    assert (beside / "thesis.docx").read_bytes() == b"years of work"


@pytest.mark.slow
def test_overwrite_replaces_a_medlora_adapter_and_marks_every_output(cohort, tmp_path):
    out = tmp_path / "adapter"
    first = T.train(config(cohort, out, epochs=1, keep_checkpoint=True))
    assert read_marker(first.adapter)["kind"] == "adapter"
    assert read_marker(tmp_path / "adapter.checkpoint")["kind"] == "checkpoint"
    old = adapter_tensors(out)
    second = T.train(config(cohort, out, epochs=1, seed=1, overwrite=True))
    assert second.status == "done" and read_marker(out)["kind"] == "adapter"
    new = adapter_tensors(out)
    assert any(not torch.equal(old[k], new[k]) for k in old)  # really replaced (another seed)
    assert not (tmp_path / "adapter.checkpoint").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no lock or staging left behind


# --- nonsensical options ----------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--alpha", "0"], "LoRA alpha must be a finite number > 0, got 0.0 (--alpha)"),
    (["--rank", "0"], "LoRA rank must be ≥ 1, got 0 (--rank)"),
    (["--lora-dropout", "1"], "LoRA dropout must be in [0, 1), got 1.0 (--lora-dropout)"),
    (["--epochs", "0"], "epochs must be at least 1, got 0 (--epochs)"),
    (["--batch-size", "0"], "batch_size must be at least 1, got 0 (--batch-size)"),
    (["--grad-accum", "0"], "grad_accum must be at least 1"),
    (["--lr", "nan"], "learning rate must be > 0, got nan (--lr)"),
    (["--lr", "inf"], "learning rate must be > 0, got inf (--lr)"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number ≥ 0"),
    (["--max-grad-norm", "nan"], "max_grad_norm must be a finite number ≥ 0"),
    (["--warmup", "1"], "warmup_fraction must be in [0, 1)"),
    (["--val-fraction", "1"], "val_fraction must be between 0 and 1"),
    (["--folds", "1"], "folds must be at least 2, got 1 (--folds)"),
    (["--seed", "-1"], "seed must be ≥ 0, got -1 (--seed)"),
    (["--workers", "-1"], "num_workers must be ≥ 0"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--last-n-blocks", "0"], "last_n_blocks must be ≥ 1"),
    (["--fov-mm", "inf"], "--fov-mm must be a finite number of millimetres > 0"),
    (["--pixels", "1"], "pixels ≥ 2"),
    (["--pixels", "7"], "smaller than medlora_tiny's 8-pixel ViT patch"),
    (["--name", "bad name/x"], "invalid adapter name"),  # checked before training, not after
]


@pytest.mark.parametrize("extra,expected", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_nonsensical_option_is_a_specific_error(cohort, tmp_path, capsys, extra, expected):
    out = tmp_path / "adapter"
    assert main(["train", "--manifest", str(cohort), "--out", str(out), *TINY, "--progress", "json", *extra]) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and "Traceback" not in captured.err
    assert [e["event"] for e in events_of(captured.out)] == ["error"]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_help_lists_every_training_option(capsys):
    from MedLoRALib.training.config import options

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(opt.flag in text for opt in options()) and "[--folds FOLDS | --val-fraction VAL_FRACTION]" in text


def test_train_config_command_line_round_trip():
    """What Slicer launches: ``cli_args()`` of a configuration parses back to the same one."""
    from MedLoRALib.cli import build_parser
    from MedLoRALib.lora_spec import LoraSpec
    from MedLoRALib.patches import PatchSpec
    from MedLoRALib.training.augment import AugmentConfig
    from MedLoRALib.training.config import TrainConfig

    assert TrainConfig(manifest="m.csv", out="a").cli_args() == ["--manifest", "m.csv", "--out", "a"]
    config = TrainConfig(manifest="m.csv", out="a", lora=LoraSpec(rank=4, alpha=8.5, targets="all", last_n_blocks=3),
                         patch_spec=PatchSpec("ortho3", fov_mm=32.0, pixels=32), folds=3, lr=3e-3,
                         augment=AugmentConfig.none(), random_init=True, threads=1, name="x y")
    args = config.cli_args()
    assert "--val-fraction" not in args and "--epochs" not in args  # defaults are left out
    parsed = build_parser("train").parse_args(["train", *args])
    assert TrainConfig.from_cli(parsed) == config


# --- one training per output ----------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from MedLoRALib.locks import OutputLock
with OutputLock(sys.argv[1], activity="trained"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_is_told_who_holds_the_output(tmp_path):
    out = tmp_path / "adapter"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusyError, match=rf"already being trained by process {holder.pid} on .* since 20"):
            OutputLock(out, activity="trained").acquire()
    finally:
        holder.communicate("", timeout=30)
    with OutputLock(out):  # released when its holder ends
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_lock_dies_with_a_killed_process(tmp_path):
    out = tmp_path / "adapter"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=30)
    with OutputLock(out):  # the stale lock file does not block
        pass


@pytest.mark.slow
def test_two_trainings_of_one_output_the_second_exits_2(cohort, tmp_path):
    out = tmp_path / "adapter"
    args = [sys.executable, "-m", "MedLoRALib", "train", "--manifest", str(cohort), "--out", str(out), *TINY,
            *SPEC_ARGS, "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.34", "--progress", "json",
            "--stop-file", str(tmp_path / "STOP")]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        assert json.loads(first.stdout.readline())["event"] == "start"  # holds the lock from here on
        first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding it
        second = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
        assert second.returncode == 2
        assert f"is already being trained by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        (tmp_path / "STOP").touch()
    finally:
        first.send_signal(signal.SIGCONT)
        rest, err = first.communicate(timeout=300)
    assert first.returncode == 3, err  # the first run was untouched: it stopped when asked, resumably
    assert events_of(rest)[-1]["event"] == "stopped"


# --- kill -9 and resume -----------------------------------------------------------------------------


def _run_until_killed(args: list[str], checkpoint: Path, kill_after_steps: int | None) -> None:
    """Run ``medlora train`` (resuming when a checkpoint exists); SIGKILL it after that many step events."""
    resume = ["--resume"] if (checkpoint / "state.json").is_file() else []
    proc = subprocess.Popen(args + resume, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV, cwd=REPO)
    steps = 0
    for line in proc.stdout:
        steps += json.loads(line)["event"] == "step"
        if kill_after_steps is not None and steps >= kill_after_steps:
            proc.kill()
            break
    assert proc.wait(timeout=300) in (0, -9)


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_is_bit_identical(cohort, tmp_path):
    straight = T.train(config(cohort, tmp_path / "straight", epochs=3))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "MedLoRALib", "train", "--manifest", str(cohort), "--out", str(out), *TINY,
            *SPEC_ARGS, "--epochs", "3", "--batch-size", "4", "--val-fraction", "0.34", "--progress", "json",
            "--progress-every", "1"]
    kills = [random.randint(1, 5) for _ in range(2)]  # the run has 6 optimizer steps
    for kill_after in kills:
        if not out.exists():
            _run_until_killed(args, tmp_path / "killed.checkpoint", kill_after)
    if not out.exists():
        _run_until_killed(args, tmp_path / "killed.checkpoint", None)
    a, b = adapter_tensors(straight.adapter), adapter_tensors(out)
    assert a.keys() == b.keys() and len(a) > 4
    assert all(torch.equal(a[k], b[k]) for k in a), f"killed after {kills} step events"  # bit-identical



# The trainer killed (SIGKILL, by itself) while it writes the finished adapter: after the weights and
# metrics.json are in its staging folder, before the plots and the rename into --out.
_KILLED_WHILE_WRITING = """
import os, signal, sys
from MedLoRALib.training import reports
reports.plot_roc = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from MedLoRALib.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # two short training runs in child processes
def test_staging_left_by_a_run_killed_while_writing_is_swept_and_resume_still_finishes(cohort, tmp_path):
    from MedLoRALib.atomic import is_leftover, staging_name

    out = tmp_path / "adapter"
    args = ["train", "--manifest", str(cohort), "--out", str(out), *FAST]
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, *args], env=ENV, cwd=REPO,
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    [staging] = [p for p in tmp_path.iterdir() if is_leftover(p.name)]
    assert staging.name.startswith(".adapter.tmp-") and (staging / "metrics.json").is_file()
    assert not out.exists() and (tmp_path / "adapter.checkpoint" / "state.json").is_file()
    users = {".adapter.tmp-notes": "mine", ".adapter.staging-1": "mine too", "adapter.txt": "and mine"}
    for name, text in users.items():  # names MedLoRA does not make stay, whatever they look like
        (tmp_path / name).write_text(text)
    running = staging_name(out)  # a staging folder of a live process (this one) stays too
    running.mkdir()

    assert train_cli(cohort, out, "--resume") == 0  # the checkpoint finishes the run; staging is not needed
    assert read_marker(out)["kind"] == "adapter" and (out / "metrics.json").is_file()
    assert not staging.exists() and running.is_dir()
    assert {name: (tmp_path / name).read_text() for name in users} == users
    assert not (tmp_path / "adapter.checkpoint").exists()  # consumed by the finished run, as always


# --- full and read-only disks ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MB tmpfs (needs root and mount; skipped otherwise), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_while_writing_the_adapter_keeps_the_previous_one(cohort, small_disk, tmp_path, capsys):
    out, checkpoints = small_disk / "adapter", tmp_path / "checkpoints"
    assert train_cli(cohort, out, "--checkpoint-dir", str(checkpoints)) == 0
    before = tree_digest(out)
    filler = fill(small_disk)
    assert train_cli(cohort, out, "--checkpoint-dir", str(checkpoints), "--overwrite", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "could not write the adapter" in err and "the disk is full" in err and "Traceback" not in err
    assert "The previous adapter there is unchanged" in err
    assert tree_digest(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["adapter", "filler"]  # no staging left behind
    filler.unlink()  # space again: the kept checkpoint finishes the run without training it again
    assert train_cli(cohort, out, "--checkpoint-dir", str(checkpoints), "--resume", "--seed", "1") == 0
    assert tree_digest(out) != before and read_marker(out)["kind"] == "adapter"


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_a_clear_error(cohort, small_disk, tmp_path, capsys):
    fill(small_disk)
    out = tmp_path / "adapter"
    assert train_cli(cohort, out, "--checkpoint-dir", str(small_disk / "checkpoints")) == 2
    err = capsys.readouterr().err
    assert "could not write the training checkpoint" in err and "the disk is full" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_read_only_output_folder_is_a_clear_error(cohort, small_disk, tmp_path, capsys):
    out = small_disk / "adapter"
    assert train_cli(cohort, out, "--checkpoint-dir", str(tmp_path / "checkpoints")) == 0
    before = tree_digest(out)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert train_cli(cohort, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "read-only file system" in err and "Traceback" not in err
    assert tree_digest(out) == before
