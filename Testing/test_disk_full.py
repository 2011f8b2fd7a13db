"""Outputs on a full disk, a read-only disk, under a file-size limit, or where a file stands: for real.

As root, each test mounts its own small tmpfs (``mount -t tmpfs -o size=2m``), fills it to
ENOSPC or remounts it read-only, and runs real ``medlora`` commands that write there. Without
root (or where mounting is refused) those tests skip with the reason; the RLIMIT_FSIZE and
file-where-a-folder-is-needed tests need no privileges. Every case checks: exit 2, one line
that says what happened (disk full, read-only, ...) and names the path, no traceback, and the
previous result at that path byte-identical (``tree_digest`` before and after).
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tree_digest

from MedLoRALib.cli import main
from MedLoRALib.ctio import save_volume
from MedLoRALib.errors import OutputError, disk_problem, explain_os_error
from MedLoRALib.synthetic import PhantomConfig, make_phantom

REPO = Path(__file__).resolve().parents[1]
SMALL = PhantomConfig(size=(96, 96, 32), spacing=(1.2, 1.2, 2.5), n_nodules=2)  # about 0.5 MB as NRRD
PHANTOM_ARGS = ["--cases", "1", "--size", "96", "96", "32", "--spacing", "1.2", "1.2", "2.5", "--nodules", "2"]


class SmallDisk:
    """A tmpfs of ``size`` mounted on ``root`` for one test."""

    def __init__(self, root: Path):
        self.root = root

    def fill(self) -> None:
        """Write zeros until the file system says ENOSPC: the disk is full for real."""
        fd = os.open(self.root / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        chunk = b"\0" * 4096
        try:
            while True:
                os.write(fd, chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def make_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_file_size_limit_* cover the unprivileged case")
    if not (shutil.which("mount") and shutil.which("umount")):
        pytest.skip("no mount/umount program here")
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); e.g. a container without CAP_SYS_ADMIN")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[Path, Path]:
    """A small phantom CT (NRRD) and a points CSV of its nodules, outside any small disk."""
    folder = tmp_path_factory.mktemp("case")
    image, nodules = make_phantom(SMALL, seed=3, case_id="PH-1")
    volume = save_volume(image, folder / "chest.nrrd")
    points = folder / "points.csv"
    with points.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["nodule_id", "x", "y", "z", "coordinate_system"])
        for nodule in nodules:
            writer.writerow([nodule.nodule_id, *nodule.centre_lps, "LPS"])
    return volume, points


def crop_args(case, out: Path, *extra: str) -> list[str]:
    volume, points = case
    return ["crop", "--volume", str(volume), "--points", str(points), "--out", str(out), *extra]


def one_line_error(capsys, command: str) -> str:
    """The command's stderr ends in exactly one 'medlora COMMAND: error: ...' line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"medlora {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- full disk ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--views", "cube", "--pixels", "32")], ids=["png-via-PIL", "nrrd-via-SimpleITK"])
def test_crop_on_a_full_disk_keeps_the_previous_patches(small_disk, case, capsys, extra):
    out = small_disk.root / "patches"
    assert main(crop_args(case, out, *extra)) == 0
    before, inputs = tree_digest(out), tree_digest(*case)
    small_disk.fill()
    assert main(crop_args(case, out, *extra, "--overwrite")) == 2
    message = one_line_error(capsys, "crop")
    assert "disk" in message and "full" in message and str(out) in message
    assert tree_digest(out) == before  # byte-identical, and no temporary file left beside them
    assert tree_digest(*case) == inputs


def test_phantom_on_a_full_disk_keeps_the_previous_cohort(small_disk, capsys):
    out = small_disk.root / "cohort"
    assert main(["phantom", "--out", str(out), *PHANTOM_ARGS]) == 0
    before = tree_digest(out)
    small_disk.fill()
    assert main(["phantom", "--out", str(out), *PHANTOM_ARGS, "--seed", "1"]) == 2
    message = one_line_error(capsys, "phantom")
    assert "disk" in message and "full" in message and str(out) in message
    assert tree_digest(out) == before


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_adapter) -> Path:
    """A store with one tiny random-init adapter 'tiny' (as test_score_cli makes it)."""
    from MedLoRALib.adapters.store import AdapterStore
    from MedLoRALib.models import LoraSpec
    from MedLoRALib.patches import PatchSpec

    spec = PatchSpec(views="multiview9", fov_mm=50.0, pixels=32)
    root = tmp_path_factory.mktemp("store")
    AdapterStore(root / "adapters").import_(tiny_adapter("tiny", spec, scale=0.0, lora=LoraSpec(rank=4)))
    return root / "adapters"


def score_args(case, store: Path, out: Path) -> list[str]:
    volume, points = case
    return ["score", "--volume", str(volume), "--points", str(points), "--adapter", "tiny", "--store", str(store),
            "--out", str(out), "--device", "cpu", "--no-tta", "--overwrite"]


def test_score_on_a_full_disk_keeps_the_previous_results(small_disk, case, store, capsys):
    out = small_disk.root / "results.csv"
    assert main(score_args(case, store, out)) == 0
    before, stored = tree_digest(small_disk.root), tree_digest(store)
    small_disk.fill()
    assert main(score_args(case, store, out)) == 2
    message = one_line_error(capsys, "score")
    assert "disk is full" in message and str(out) in message
    assert {k: v for k, v in tree_digest(small_disk.root).items() if not k.endswith("filler")} == before
    assert tree_digest(store) == stored


@pytest.mark.parametrize("dest", ["tiny.zip", "tiny-folder"])
def test_adapter_export_to_a_full_disk_leaves_nothing_half_written(small_disk, store, capsys, dest):
    stored = tree_digest(store)
    small_disk.fill()
    target = small_disk.root / dest
    assert main(["adapters", "--store", str(store), "export", "tiny", str(target)]) == 2
    message = one_line_error(capsys, "adapters")
    assert "disk is full" in message and str(small_disk.root) in message
    assert sorted(p.name for p in small_disk.root.iterdir()) == ["filler"]  # no zip, folder or temporary file
    assert tree_digest(store) == stored


def test_train_on_a_full_disk_says_so(small_disk, tmp_path, capsys):
    from MedLoRALib.synthetic import write_cohort

    manifest = write_cohort(tmp_path / "cohort", n_cases=4, seed=0, config=SMALL)
    inputs = tree_digest(manifest.parent)
    small_disk.fill()
    code = main(["train", "--manifest", str(manifest), "--out", str(small_disk.root / "adapter"),
                 "--backbone", "medlora_tiny", "--random-init", "--threads", "1", "--views", "ortho3",
                 "--fov-mm", "32", "--pixels", "32", "--epochs", "1", "--val-fraction", "0.5", "--progress", "none"])
    assert code == 2
    message = one_line_error(capsys, "train")
    assert "disk" in message and "full" in message and str(small_disk.root) in message
    assert tree_digest(manifest.parent) == inputs


# --- read-only disk -------------------------------------------------------------------------------


def test_read_only_disk_refuses_every_writer_in_one_line(small_disk, case, store, capsys):
    patches, cohort, results = small_disk.root / "patches", small_disk.root / "cohort", small_disk.root / "r.csv"
    assert main(crop_args(case, patches)) == 0
    assert main(["phantom", "--out", str(cohort), *PHANTOM_ARGS]) == 0
    assert main(score_args(case, store, results)) == 0
    capsys.readouterr()
    before = tree_digest(small_disk.root)
    small_disk.make_read_only()
    runs = {"crop": crop_args(case, patches, "--overwrite"),
            "phantom": ["phantom", "--out", str(cohort), *PHANTOM_ARGS, "--overwrite"],
            "score": score_args(case, store, results),
            "adapters": ["adapters", "--store", str(store), "export", "tiny", str(small_disk.root / "t.zip")]}
    for command, argv in runs.items():
        assert main(argv) == 2, command
        message = one_line_error(capsys, command)
        assert "read-only file system" in message and str(small_disk.root) in message, message
    assert tree_digest(small_disk.root) == before


# --- file-size limit (no root needed) -------------------------------------------------------------


# the child sets its own limit (no preexec_fn: this test process may run threads), ignores SIGXFSZ
# so a write past the limit fails with EFBIG instead of killing it, then runs `medlora`
_CHILD = ("import resource, runpy, signal, sys\n"
          "limit = int(sys.argv.pop(1))\n"
          "if limit:\n"
          "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
          "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
          "sys.argv[0] = 'medlora'\n"
          "runpy.run_module('MedLoRALib', run_name='__main__')\n")


def _medlora(argv: list[str], file_size_limit: int = 0) -> subprocess.CompletedProcess:
    """``medlora ARGV`` in a child process, under RLIMIT_FSIZE when ``file_size_limit`` is set."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, str(file_size_limit), *argv], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE and SIGXFSZ are POSIX only")
@pytest.mark.parametrize("extra", [(), ("--views", "cube", "--pixels", "32")], ids=["png-via-PIL", "nrrd-via-SimpleITK"])
def test_file_size_limit_is_one_line_and_keeps_the_previous_patches(tmp_path, case, extra):
    out = tmp_path / "patches"
    assert main(crop_args(case, out, *extra)) == 0
    before = tree_digest(out)
    result = _medlora(crop_args(case, out, *extra, "--overwrite"), file_size_limit=2000)  # index.csv fits, a patch does not
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "at most 2000 bytes" in result.stderr or "file-size limit" in result.stderr, result.stderr
    assert tree_digest(out) == before


def test_verbose_still_shows_the_traceback(tmp_path, case):
    result = _medlora(["-v", *crop_args(case, tmp_path / "patches")], file_size_limit=2000)
    assert result.returncode not in (0, 2) and "Traceback" in result.stderr and "File too large" in result.stderr


# --- a file where a folder is needed (no root needed) ---------------------------------------------


def test_a_file_where_the_output_folder_should_be(tmp_path, case, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a researcher's notes\n")
    before = tree_digest(tmp_path)
    for argv, command in [(crop_args(case, blocker), "crop"), (crop_args(case, blocker / "patches"), "crop"),
                          (["phantom", "--out", str(blocker), *PHANTOM_ARGS], "phantom"),
                          (["phantom", "--out", str(blocker / "cohort"), *PHANTOM_ARGS], "phantom")]:
        assert main(argv) == 2, argv
        message = one_line_error(capsys, command)
        assert f"{blocker} is a file where a folder is needed" in message or (
            f"--out {blocker} is a file;" in message and "folder" in message) or (
            "exists as a file where a folder is needed" in message and str(blocker) in message), message
    assert tree_digest(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 0555 folder anyway; the read-only mount test covers root")
def test_a_folder_without_write_permission(tmp_path, case, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(crop_args(case, locked / "patches")) == 2
        message = one_line_error(capsys, "crop")
        assert "permission denied" in message and str(locked) in message
    finally:
        locked.chmod(0o755)


# --- the explanation table itself -----------------------------------------------------------------


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only"),
    (errno.EACCES, "permission denied"), (errno.EFBIG, "file-size limit"), (errno.EISDIR, "folder where a file"),
    (errno.ENAMETOOLONG, "too long")])
def test_each_errno_gets_what_and_what_to_do(code, words):
    error = explain_os_error(OSError(code, os.strerror(code), "/data/out/.x.png.tmp123.png"), option="--out")
    assert isinstance(error, OutputError)
    text = str(error)
    assert words in text and "\n" not in text and text.count(";") == 1
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        assert "cannot write /data/out:" in text  # the folder, not the temporary file's name
    if code != errno.EFBIG:
        assert text.endswith("(--out)")


def test_disk_problem_is_silent_on_a_healthy_disk(tmp_path):
    import resource

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        pytest.skip("this test process runs under a file-size limit, which disk_problem reports")
    if shutil.disk_usage(tmp_path).free < 64 << 20:
        pytest.skip("the temporary folder's disk is nearly full")
    assert disk_problem([tmp_path / "not-yet" / "out.csv"]) == ""


@pytest.mark.parametrize("bug", [RuntimeError("boom"), ValueError("boom"), KeyError("boom")])
def test_a_bug_on_a_healthy_disk_keeps_its_traceback(tmp_path, monkeypatch, bug):
    """Only the user's problems become one line: an unexplained exception still propagates."""
    import MedLoRALib.cli.phantom as phantom_cli

    def broken(args):
        raise bug

    monkeypatch.setattr(phantom_cli, "run", broken)
    if shutil.disk_usage(tmp_path).free < 64 << 20:
        pytest.skip("the temporary folder's disk is nearly full")
    with pytest.raises(type(bug)):
        main(["phantom", "--out", str(tmp_path / "cohort")])
