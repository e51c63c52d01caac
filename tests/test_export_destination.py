"""Where export writes: it never destroys what it did not make (a checkpoint, a directory of other files), cleans up
after exports that were killed, and says in one line when it cannot write."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_checkpoint


def _edge_runtime(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` with its SHA-256: what must be unchanged after a refused export."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    return build_checkpoint(tmp_path / "ckpt", "shared-gqa")


def test_force_never_replaces_the_checkpoint_being_exported(checkpoint):
    before = _snapshot(checkpoint)
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(checkpoint), "--force"))
    assert f"{checkpoint}: this is where the checkpoint being exported lives" in line
    assert _snapshot(checkpoint) == before


def test_force_never_replaces_a_directory_holding_the_checkpoint(checkpoint):
    before = _snapshot(checkpoint.parent)
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(checkpoint.parent), "--force"))
    assert "this is where the checkpoint being exported lives" in line
    assert _snapshot(checkpoint.parent) == before


def test_force_never_replaces_a_directory_that_is_not_an_artifact(checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(7):
        (photos / f"img{i}.jpg").write_bytes(bytes([i]) * 100)
    before = _snapshot(photos)
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(photos), "--force"))
    assert line == (f"error: {photos}: is not an edge-runtime artifact (no edge-runtime-artifact manifest.json) and "
                    "holds img0.jpg, img1.jpg, img2.jpg, img3.jpg, img4.jpg and 2 more; --force only replaces "
                    "artifacts, so choose another output path")
    assert _snapshot(photos) == before


def test_force_never_deletes_other_files_kept_in_an_artifact(checkpoint, artifacts, tmp_path):
    import shutil

    out = tmp_path / "artifact"
    shutil.copytree(artifacts["shared-gqa"], out)
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(out), "--force"))
    assert (f"{out}: holds files that are not part of the artifact (notes.txt); --force would delete them: move them "
            "out first") in line
    assert _snapshot(out) == before


def test_force_never_replaces_a_file(checkpoint, tmp_path):
    out = tmp_path / "thesis.pdf"
    out.write_bytes(b"%PDF-1.7 ...")
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(out), "--force"))
    assert f"{out}: is a file, not an edge-runtime artifact" in line
    assert out.read_bytes() == b"%PDF-1.7 ..."


def _killed_export(checkpoint: Path, out: Path) -> Path:
    """Start an export as its own process, SIGKILL it once it has written the PLE store, return its partial."""
    script = ("import sys, time\n"
              "from edge_runtime.export import exporter\n"
              "write = exporter._write_ple_store\n"
              "def stall(*args):\n"
              "    write(*args)\n"
              "    print('written', flush=True)\n"
              "    time.sleep(120)\n"
              "exporter._write_ple_store = stall\n"
              "exporter.export_checkpoint(sys.argv[1], sys.argv[2])\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(checkpoint), str(out)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "written\n"
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    partial = out.parent / f".{out.name}.partial-{process.pid}"
    assert {"weights.bin", "ple.bin"} <= {p.name for p in partial.iterdir()}
    return partial


def test_the_next_export_removes_what_a_killed_export_left(checkpoint, tmp_path):
    out = tmp_path / "out" / "artifact"
    partial = _killed_export(checkpoint, out)
    result = _edge_runtime("export", str(checkpoint), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (f"note: removed {partial}, left by an export that was interrupted (process "
            f"{partial.name.rsplit('-', 1)[1]} is gone)") in result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["artifact"]


def test_leftovers_that_are_not_only_export_files_or_whose_process_runs_are_kept(checkpoint, tmp_path):
    out = tmp_path / "artifact"
    alive = tmp_path / f".artifact.partial-{os.getppid()}"
    foreign = tmp_path / ".artifact.partial-999999999"
    for leftover in (alive, foreign):
        leftover.mkdir()
        (leftover / "weights.bin").write_bytes(b"x")
    (foreign / "diary.txt").write_text("mine")
    result = _edge_runtime("export", str(checkpoint), "-o", str(out))
    assert result.returncode == 0 and "note:" not in result.stderr, result.stderr
    assert alive.is_dir() and (foreign / "diary.txt").is_file()


@pytest.fixture()
def read_only_dir(tmp_path) -> Path:
    """A directory nobody can write into: a read-only tmpfs when running as root (which ignores permission bits),
    else one without write permission."""
    where = tmp_path / "read-only"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_unwritable_outputs_are_one_line(checkpoint, tmp_path, read_only_dir):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    cases = {read_only_dir / "artifact": reason, Path("/proc/edge-runtime-x"): "No such file or directory",
             Path("/sys/edge-runtime-x"): "Operation not permitted"}
    for out, why in cases.items():
        line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(out)))
        assert line.startswith(f"error: cannot write the artifact at {out}: {why}"), line
        assert line.endswith("choose an output path on a writable filesystem with room for it"), line
    line = _one_error_line(_edge_runtime("export", str(checkpoint), "-o", str(a_file / "sub" / "artifact")))
    assert line == f"error: {a_file / 'sub' / 'artifact'}: {a_file} is a file, not a directory; choose another output path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ckpt", "read-only"]


def test_an_unwritable_cache_is_one_line_on_first_run(tmp_path, read_only_dir):
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    line = _one_error_line(_edge_runtime("run", "The list", "-n", "2",
                                         env={"EDGE_RUNTIME_CACHE": str(read_only_dir / "cache")}))
    assert line.startswith(f"error: cannot write the bundled model's artifact into {read_only_dir / 'cache'}: "
                           f"{reason}"), line
    assert line.endswith("set EDGE_RUNTIME_CACHE to a writable directory"), line
