"""Atomic writes: a result appears whole or not at all, and a failed write keeps the old one."""

import os

import pytest

from distill_forget.storage import atomic_dir, atomic_file, torch_load, write_json


def test_a_failed_file_write_keeps_the_previous_result(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"ua": 1})
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text('{"ua": ')  # killed half-way
        raise RuntimeError("crash")
    assert path.read_text().strip().replace(" ", "").replace("\n", "") == '{"ua":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_a_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "pipeline"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "first"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_results_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(mask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="unreadable"):
        torch_load(bad)
