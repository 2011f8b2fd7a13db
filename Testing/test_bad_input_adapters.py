"""Bad input to the adapter store and packages (issue 11): refused clearly, nothing of the user's lost.

Each case checks the exit code or error type, the message's key words, and that nothing
MedLoRA did not write changed (``tree_digest`` before and after). Adapters here are built
without torch (``full`` mode with one float tensor) — the store never needs torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest

from MedLoRALib.adapters.archive import (
    MODEL_WEIGHTS,
    ArchiveLimits,
    read_adapter_files,
    read_checked,
    read_manifest,
    write_adapter,
)
from MedLoRALib.adapters.manifest import AdapterManifest
from MedLoRALib.adapters.store import AdapterStore
from MedLoRALib.atomic import is_leftover
from MedLoRALib.cli import main
from MedLoRALib.errors import AdapterError, OutputError

REPO = Path(__file__).resolve().parents[1]


def _weights(nbytes: int, seed: int = 0) -> bytes:
    """A complete safetensors file holding one float32 tensor of about ``nbytes`` random bytes."""
    count = max(1, nbytes // 4)
    header = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + np.random.default_rng(seed).bytes(4 * count)


def _manifest(name: str = "site", description: str = "") -> AdapterManifest:
    return AdapterManifest(name=name, backbone="medlora_tiny", backbone_sha256="random-init", random_init=True,
                           mode="full", description=description)


def _adapter(dest: Path, name: str = "site", description: str = "", nbytes: int = 4096, seed: int = 0,
             weights: bytes | None = None) -> Path:
    return write_adapter(_manifest(name, description), {MODEL_WEIGHTS: weights or _weights(nbytes, seed)}, dest)


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["adapters", *map(str, args)])
    return code, capsys.readouterr().err


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    store.import_(_adapter(tmp_path / "src" / "site.zip", description="stored"))
    return store


# --- export: never replace without --overwrite, never replace what is not an adapter ------------------

@pytest.mark.parametrize("suffix", [".zip", ""])
def test_export_refuses_an_existing_adapter_without_force_then_replaces_it(tmp_path, store, capsys, suffix):
    dest = _adapter(tmp_path / "out" / f"old{suffix}", name="old", description="old", seed=1)
    before = tree_digest(tmp_path / "out")
    code, err = _cli(capsys, "--store", store.root, "export", "site", dest)
    assert code == 2 and "already holds an adapter" in err and "--overwrite" in err
    assert tree_digest(tmp_path / "out") == before
    code, _ = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
    assert code == 0 and read_checked(dest).manifest.description == "stored"
    assert _visible(tmp_path / "out") == [dest.name] and not any(is_leftover(p.name) for p in dest.parent.iterdir())


def test_export_force_never_replaces_what_is_not_an_adapter(tmp_path, store, capsys):
    folder = tmp_path / "study"  # a folder of the user's, with a manifest.json that is not ours
    (folder / "sub").mkdir(parents=True)
    (folder / "manifest.json").write_text('{"patients": 3}')
    (folder / "sub" / "scan.dcm").write_bytes(b"DICM" * 100)
    not_zip = tmp_path / "report.zip"
    not_zip.write_text("a text file named .zip")
    other_zip = tmp_path / "photos.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("holiday.jpg", b"\xff\xd8" * 50)
    before = tree_digest(tmp_path / "study", not_zip, other_zip)
    for dest in (folder, not_zip, other_zip):
        code, err = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
        assert code == 2 and "not a MedLoRA adapter" in err and "will not replace" in err, err
    assert tree_digest(tmp_path / "study", not_zip, other_zip) == before


def test_export_into_a_plain_folder_puts_the_adapter_inside(tmp_path, store, capsys):
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "notes.txt").write_text("mine")
    code, _ = _cli(capsys, "--store", store.root, "export", "site", tmp_path / "share")
    assert code == 0 and read_checked(tmp_path / "share" / "site").manifest.name == "site"
    assert (tmp_path / "share" / "notes.txt").read_text() == "mine"


def _trained_folder(dest: Path, seed: int) -> Path:
    """An adapter folder as ``medlora train`` leaves it: the adapter, its reports, MedLoRA's marker,
    and a file the user added."""
    from MedLoRALib.adapters.overwrite import TRAINING_REPORTS
    from MedLoRALib.outputs import ADAPTER, write_marker

    _adapter(dest, description="trained", seed=seed)
    for name in TRAINING_REPORTS:
        (dest / name).write_bytes(f"report {name} of the run".encode())
    write_marker(dest, ADAPTER)
    (dest / "notes.txt").write_text("mine")
    return dest


def test_export_overwrite_never_drops_training_reports_or_files_beside_the_adapter(tmp_path, store, capsys):
    other = _trained_folder(tmp_path / "out" / "other", seed=5)  # other weights than the stored 'site'
    before = tree_digest(tmp_path / "out")
    code, err = _cli(capsys, "--store", store.root, "export", "site", other, "--overwrite")
    assert code == 2 and "Traceback" not in err
    assert ("the training reports of adapter 'site' (calibration.png, metrics.json, roc.png, training_curves.png)"
            in err and "files MedLoRA did not write (notes.txt)" in err and "left as it is" in err), err
    assert tree_digest(tmp_path / "out") == before

    same = _trained_folder(tmp_path / "out" / "same", seed=0)  # the stored adapter's own weights
    reports = tree_digest(*(p for p in same.iterdir() if p.name != "manifest.json"))
    code, _ = _cli(capsys, "--store", store.root, "export", "site", same, "--overwrite")
    assert code == 0 and read_checked(same).manifest.description == "stored"  # the manifest is the store's
    assert tree_digest(*(p for p in same.iterdir() if p.name != "manifest.json")) == reports  # the rest stays
    assert not any(is_leftover(p.name) for p in [*same.iterdir(), *same.parent.iterdir()])


def test_export_overwrite_is_refused_while_another_process_writes_the_folder(tmp_path, store, capsys):
    from MedLoRALib.locks import OutputLock

    dest = _trained_folder(tmp_path / "out" / "run", seed=0)  # same weights: only manifest.json would be rewritten
    before = tree_digest(tmp_path / "out")
    with OutputLock(dest, activity="trained"):  # a training of that folder still running (it swaps it when done)
        code, err = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
    assert code == 2 and "is already being written by process" in err, err
    assert tree_digest(tmp_path / "out") == before
    code, _ = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
    assert code == 0 and read_checked(dest).manifest.description == "stored"


def test_export_overwrite_counts_a_users_empty_folder_and_symlink_as_theirs(tmp_path, store, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    empty = _adapter(tmp_path / "out" / "empty", seed=5)  # other weights than the stored 'site'
    (empty / "scans").mkdir()  # a folder the user made, nothing in it yet
    linked = _adapter(tmp_path / "out" / "linked", seed=5)
    (linked / "data").symlink_to(outside, target_is_directory=True)
    before = tree_digest(tmp_path / "out", outside)
    for dest, name in ((empty, "scans"), (linked, "data")):
        code, err = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
        assert code == 2 and f"files MedLoRA did not write ({name})" in err, err
    assert tree_digest(tmp_path / "out", outside) == before and (empty / "scans").is_dir()

# --- import: always verified; --overwrite only replaces a stored adapter of the same name ------------------

@pytest.mark.parametrize("force", [False, True])
def test_truncated_safetensors_is_refused_with_and_without_force(tmp_path, store, capsys, force):
    whole = _weights(8192, seed=3)
    truncated = _adapter(tmp_path / "bad.zip", weights=whole[:-100])  # hashes recomputed: they match
    before = tree_digest(store.root)
    code, err = _cli(capsys, "--store", store.root, "import", truncated, *(["--force"] if force else []))
    assert code == 2 and "not a complete safetensors file" in err and "truncated" in err, err
    assert tree_digest(store.root) == before and read_checked(store.path("site")).manifest.description == "stored"
    with pytest.raises(AdapterError, match="not a complete safetensors"):
        read_checked(truncated)  # what the engine and load_adapter read through


@pytest.mark.parametrize("damage", ["header", "padding", "garbage"])
def test_damaged_weights_are_refused(tmp_path, damage):
    whole = _weights(4096, seed=4)
    bad = {"header": (10**9).to_bytes(8, "little") + whole[8:], "padding": whole + b"\0" * 16,
           "garbage": b"not safetensors at all"}[damage]
    with pytest.raises(AdapterError, match="not a complete safetensors file"):
        read_checked(_adapter(tmp_path / "bad", weights=bad))


def test_import_force_replaces_only_the_same_name_and_still_verifies(tmp_path, store, capsys):
    newer = _adapter(tmp_path / "newer.zip", description="newer", seed=5)
    code, err = _cli(capsys, "--store", store.root, "import", newer)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _ = _cli(capsys, "--store", store.root, "import", newer, "--force")  # the old spelling still works
    assert code == 0 and store.info("site").description == "newer" and store.names() == ["site"]
    stranger = store.root / "notes"  # not an adapter: --overwrite must not replace it
    stranger.mkdir()
    (stranger / "todo.txt").write_text("keep me")
    code, err = _cli(capsys, "--store", store.root, "import", newer, "--name", "notes", "--force")
    assert code == 2 and "not a MedLoRA adapter" in err
    assert (stranger / "todo.txt").read_text() == "keep me"


# --- packages that are not what they claim -------------------------------------------------------------

def test_a_file_that_is_not_a_zip_says_so(tmp_path, store, capsys):
    fake = tmp_path / "adapter.zip"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    code, err = _cli(capsys, "--store", store.root, "import", fake)
    assert code == 2 and "not a zip archive" in err and "JSON" not in err, err
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    code, err = _cli(capsys, "--store", store.root, "info", other)
    assert code == 2 and "is not an adapter" in err and "JSON" not in err, err
    cut = tmp_path / "cut.zip"  # an interrupted download: the zip's directory at its end is missing
    whole = _adapter(tmp_path / "whole.zip").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    code, err = _cli(capsys, "--store", store.root, "import", cut)
    assert code == 2 and "not a zip archive" in err, err


def _bomb(path: Path, megabytes: int) -> Path:
    """A zip holding a valid manifest and ``megabytes`` MiB of zeros that pack to about 1000× less."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(MODEL_WEIGHTS, "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(zeros)
        archive.writestr("manifest.json", _manifest().to_json())
    return path


def test_zip_bomb_is_refused_before_unpacking(tmp_path, store, capsys):
    bomb = _bomb(tmp_path / "bomb.zip", 64)
    assert bomb.stat().st_size < 1 << 20
    before = tree_digest(store.root)
    started = time.perf_counter()
    code, err = _cli(capsys, "--store", store.root, "import", bomb)
    assert code == 2 and "zip bomb" in err and "without unpacking" in err, err
    assert time.perf_counter() - started < 2.0 and tree_digest(store.root) == before
    small = _adapter(tmp_path / "ok.zip", nbytes=1 << 16)
    with pytest.raises(AdapterError, match=r"would unpack to .* GiB, over the limit"):
        read_adapter_files(small, ArchiveLimits(max_total_bytes=1 << 15))


@pytest.mark.parametrize("member", ["../evil.safetensors", "/abs/evil.safetensors", "a\\..\\evil"])
def test_path_traversal_and_many_members_are_refused(tmp_path, member):
    package = tmp_path / "evil.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("manifest.json", _manifest().to_json())
        archive.writestr(member, b"x")
    with pytest.raises(AdapterError, match="unsafe file names"):
        read_manifest(package)
    crowded = tmp_path / "crowded.zip"
    with zipfile.ZipFile(crowded, "w") as archive:
        archive.writestr("manifest.json", _manifest().to_json())
        for i in range(70):
            archive.writestr(f"f{i}", b"")
    with pytest.raises(AdapterError, match="holds 71 files"):
        read_manifest(crowded)


@pytest.mark.parametrize("field, value", [("name", 5), ("files", []), ("label_names", ["a", 2]),
                                          ("temperature", float("inf")), ("files", {"x": "not-a-hash"})])
def test_manifest_with_wrong_types_is_an_adapter_error(tmp_path, field, value):
    folder = _adapter(tmp_path / "a")
    data = json.loads((folder / "manifest.json").read_text())
    data[field] = value
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="invalid adapter manifest"):
        read_manifest(folder)


# --- torch-free, as 3D Slicer's process uses it ----------------------------------------------------------

def test_store_import_export_and_list_run_without_torch(tmp_path):
    from helpers import assert_imports_without

    source = _adapter(tmp_path / "src.zip")
    assert_imports_without(["MedLoRALib.adapters.store"], forbidden=("torch", "safetensors", "timm", "peft"), then=f"""
from MedLoRALib.adapters.store import AdapterStore
store = AdapterStore({str(tmp_path / 'store')!r})
store.import_({str(source)!r})
store.export('site', {str(tmp_path / 'out.zip')!r})
assert [m.name for m in store.list()] == ['site']
""")
    assert read_checked(tmp_path / "out.zip").manifest.name == "site"


# --- kill -9 in the middle of a write ------------------------------------------------------------------

_RUN = """
import sys
from MedLoRALib.adapters.store import AdapterStore
store = AdapterStore(sys.argv[2])
if sys.argv[1] == 'export':
    store.export('site', sys.argv[3], overwrite=True)
else:
    store.import_(sys.argv[3], overwrite=True)
"""


def _killed_runs(args: list[str], reset, check) -> list[str]:
    """Time one whole run of ``_RUN``, then kill it with SIGKILL at 10 points across that time.

    ``reset`` puts the old adapter back before each run; ``check`` returns what is there after.
    """
    command = [sys.executable, "-c", _RUN, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reset()
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    duration = time.perf_counter() - started
    assert check() == "new"
    outcomes = []
    for fraction in np.linspace(0.05, 1.1, 10):
        reset()
        process = subprocess.Popen(command, env=env)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        outcomes.append(check())
    assert set(outcomes) <= {"old", "new"} and outcomes[0] == "old", outcomes  # 5%: before any write
    print(f"{args[0]}: {duration:.2f} s per run; after SIGKILL at 5%..110% of it: {outcomes}")
    return outcomes


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".zip", ""])
def test_export_killed_mid_write_leaves_the_old_or_the_new_adapter(tmp_path, suffix):
    store = AdapterStore(tmp_path / "store")
    store.import_(_adapter(tmp_path / "new.zip", description="new", nbytes=8 << 20, seed=1))
    old_store = AdapterStore(tmp_path / "old-store")
    old_store.import_(_adapter(tmp_path / "old.zip", description="old", nbytes=1 << 16))
    out = tmp_path / "out"
    dest = out / f"shared{suffix}"

    def check() -> str:
        assert _visible(out) == [dest.name]  # a leftover never looks like an adapter
        return read_checked(dest).manifest.description  # complete and verified: old or new

    def reset() -> None:
        old_store.export("site", dest, overwrite=True)

    _killed_runs(["export", str(store.root), str(dest)], reset, check)
    reset()  # the next write sweeps what killed runs left
    assert [p.name for p in out.iterdir()] == [dest.name]


@pytest.mark.slow
def test_import_killed_mid_write_leaves_the_old_or_the_new_adapter(tmp_path):
    store = AdapterStore(tmp_path / "store")
    old = _adapter(tmp_path / "old.zip", description="old", nbytes=1 << 16)
    source = _adapter(tmp_path / "new", description="new", nbytes=32 << 20, seed=2)

    def check() -> str:
        assert store.names() == ["site"]
        return read_checked(store.path("site")).manifest.description

    _killed_runs(["import", str(store.root), str(source)], lambda: store.import_(old, overwrite=True), check)
    store.delete("site")  # a change to the store sweeps what killed runs left
    assert list(store.root.iterdir()) == []


# --- full disk and read-only destination, for real -------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root and mount rights), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_export_to_a_full_disk_keeps_the_previous_adapter(tmp_path, capsys, small_disk):
    store = AdapterStore(tmp_path / "store")
    store.import_(_adapter(tmp_path / "big.zip", description="big", nbytes=3 << 20, seed=7))
    for suffix in (".zip", ""):
        dest = _adapter(small_disk / f"site{suffix}", description="old", nbytes=1 << 16)
        before = tree_digest(small_disk)
        code, err = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
        assert code == 2 and "disk is full" in err and str(dest) in err and "unchanged" in err, err
        assert tree_digest(small_disk) == before and sorted(p.name for p in small_disk.iterdir()) == sorted(
            p.name for p in small_disk.iterdir() if not is_leftover(p.name))
    with pytest.raises(OutputError) as caught:
        store.export("site", small_disk / "site.zip", overwrite=True)
    assert isinstance(caught.value, OSError) and caught.value.errno is not None


def test_export_to_a_read_only_folder_says_so(tmp_path, capsys, small_disk):
    store = AdapterStore(tmp_path / "store")
    store.import_(_adapter(tmp_path / "s.zip", description="new"))
    dest = _adapter(small_disk / "site.zip", description="old")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = tree_digest(small_disk)
    code, err = _cli(capsys, "--store", store.root, "export", "site", dest, "--overwrite")
    assert code == 2 and "read-only" in err and str(dest) in err, err
    assert tree_digest(small_disk) == before


def test_import_into_a_store_on_a_full_disk_keeps_the_stored_adapter(tmp_path, capsys, small_disk):
    store = AdapterStore(small_disk / "store")
    store.import_(_adapter(tmp_path / "old.zip", description="old", nbytes=1 << 16))
    before = tree_digest(small_disk)
    code, err = _cli(capsys, "--store", store.root, "import", _adapter(tmp_path / "big", nbytes=3 << 20), "--force")
    assert code == 2 and "disk is full" in err and str(store.root / "site") in err, err
    assert tree_digest(small_disk) == before and store.names() == ["site"]
    assert [p.name for p in store.root.iterdir()] == ["site"]  # the partial copy was removed


def test_a_folder_set_aside_by_a_killed_replace_comes_back(tmp_path, monkeypatch):
    """Where folders cannot be swapped in one step (not Linux), a kill between the two renames of
    ``replace_dir`` leaves the old adapter set aside; the store puts it back and drops dead staging."""
    from MedLoRALib import atomic

    store = AdapterStore(tmp_path / "store")
    store.import_(_adapter(tmp_path / "a.zip", description="old"))
    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    os.replace(store.root / "site", store.root / f".site.old-{dead}-0123abcd")
    _adapter(store.root / f".site.tmp-{dead}-0123abcd", description="half")
    assert store.names() == ["site"] and store.info("site").description == "old"
    assert sorted(p.name for p in store.root.iterdir()) == ["site"]
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)  # the two-rename path
    store.import_(_adapter(tmp_path / "b.zip", description="new"), overwrite=True)
    assert store.info("site").description == "new" and sorted(p.name for p in store.root.iterdir()) == ["site"]
