"""The load-time SHA-256 check's memory of files found intact (verified.json in the user cache)."""

from __future__ import annotations

import json
import shutil

from edge_runtime.artifact import read_manifest
from edge_runtime.integrity import STAMPS_FILE, check_artifact
from edge_runtime.user_cache import cache_dir


def test_stamps_of_deleted_files_are_dropped_when_the_file_is_written(artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(artifacts["shared-gqa"], first)
    shutil.copytree(artifacts["shared-gqa"], second)
    check_artifact(first, read_manifest(first))
    stamps_path = cache_dir() / STAMPS_FILE
    assert {str((first / name).resolve()) for name in read_manifest(first).files} == set(json.loads(
        stamps_path.read_text()))
    shutil.rmtree(first)
    check_artifact(second, read_manifest(second))
    assert {str((second / name).resolve()) for name in read_manifest(second).files} == set(json.loads(
        stamps_path.read_text()))
