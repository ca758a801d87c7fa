"""letkit.checkpointing: what a training checkpoint is (name, completeness, per-file SHA-256), which one a run
resumes from, retention, and the run directory lock. The 2-rank runs in tests/test_fsdp_example.py use all of it."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from letkit.checkpointing import (RunDirInUse, RunDirLock, checkpoint_problem, file_owner, find_checkpoint,
                                  load_checkpoint, locked_run_dir, prune_checkpoints, save_checkpoint)


def fake_checkpoint(directory, number, contents, **overrides):
    """A checkpoint folder as save_checkpoint writes it: files of ``contents`` and a trainer_state.json with their
    sizes and SHA-256 (``overrides`` replace its fields)."""
    path = directory / f"step_{number:07d}"
    path.mkdir(parents=True)
    for name, data in contents.items():
        (path / name).write_bytes(data)
    sizes = {n: len(d) for n, d in contents.items()}
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in contents.items()}
    (path / "trainer_state.json").write_text(json.dumps({"step": number, "files": sizes, "sha256": digests, **overrides}))
    return path


def test_find_checkpoint_rules(tmp_path, caplog):
    assert find_checkpoint(tmp_path / "none") == (None, [])
    good = fake_checkpoint(tmp_path, 1, {".metadata": b"meta", "__0_0.distcp": b"abc"})
    fake_checkpoint(tmp_path, 2, {".metadata": b"m"}, step=7)
    bad_size = fake_checkpoint(tmp_path, 3, {".metadata": b"m", "__0_0.distcp": b"abc"})
    (bad_size / "__0_0.distcp").write_bytes(b"ab")
    missing = fake_checkpoint(tmp_path, 4, {".metadata": b"m"})
    (missing / ".metadata").unlink()
    (fake_checkpoint(tmp_path, 5, {}) / "trainer_state.json").write_text("{not json")
    flipped_shard = fake_checkpoint(tmp_path, 6, {".metadata": b"m", "__1_0.distcp": b"abc"})
    (flipped_shard / "__1_0.distcp").write_bytes(b"abd")
    flipped_metadata = fake_checkpoint(tmp_path, 7, {".metadata": b"meta", "__0_0.distcp": b"abc"})
    (flipped_metadata / ".metadata").write_bytes(b"mexa")
    (tmp_path / "step_0000008.tmp").mkdir()
    (tmp_path / "notes").mkdir()
    found, skipped = find_checkpoint(tmp_path)
    assert found == good and [p.name for p in skipped] == [f"step_{n:07d}" for n in range(7, 1, -1)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 7 and all(w.startswith("skipping ") for w in warnings)
    assert "(its save was interrupted)" in warnings[0]
    assert ".metadata has other bytes than were written" in warnings[1]
    assert "__1_0.distcp has other bytes than were written" in warnings[2]
    assert "Expecting property name" in warnings[3] and ".metadata" in warnings[4]
    assert "__0_0.distcp has 2 bytes, 3 were written" in warnings[5] and "trainer_state.json says step 7" in warnings[6]

    # written before checksums were recorded: only the sizes can be checked, so it is found (the caller warns)
    old = fake_checkpoint(tmp_path, 9, {".metadata": b"m", "__0_0.distcp": b"abc"})
    (old / "__0_0.distcp").write_bytes(b"abd")  # same size: not detectable without a checksum
    state = json.loads((old / "trainer_state.json").read_text())
    del state["sha256"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert find_checkpoint(tmp_path) == (old, [])


def test_checkpoint_problem_names_the_file_and_stays_inside_the_directory(tmp_path):
    """Any directory name (export reads copies), but a step_N name must match trainer_state.json's step; listed
    names that would reach outside the directory are refused before any file is opened."""
    (tmp_path / "secret").write_bytes(b"abc")
    copy = fake_checkpoint(tmp_path, 3, {".metadata": b"m", "__0_0.distcp": b"abc"})
    assert checkpoint_problem(copy.rename(tmp_path / "my-copy")) is None
    for i, name in enumerate(("../secret", "sub/x", "..")):
        path = fake_checkpoint(tmp_path / f"escape{i}", 1, {".metadata": b"m"})
        state = json.loads((path / "trainer_state.json").read_text())
        state["sha256"][name] = hashlib.sha256(b"abc").hexdigest()
        (path / "trainer_state.json").write_text(json.dumps(state))
        assert checkpoint_problem(path) == f"trainer_state.json lists {name!r}, which is not a file name in the checkpoint directory"
    assert checkpoint_problem(tmp_path / "step_0000004.tmp") == "its save was interrupted (.tmp)"
    assert checkpoint_problem(tmp_path / "nothing") == "it has no trainer_state.json"
    no_files = fake_checkpoint(tmp_path / "no_files", 1, {".metadata": b"m"})
    (no_files / "trainer_state.json").write_text(json.dumps({"step": 1}))
    assert checkpoint_problem(no_files) == "trainer_state.json has no 'files'"


def test_save_records_sizes_checksums_and_rng_and_load_restores_them(world_of_one, tmp_path):
    """save_checkpoint writes under .tmp and renames; trainer_state.json holds the caller's fields, the step, the
    world size, the RNG states and each file's size and SHA-256 (recomputed here); load_checkpoint fills the state
    in place and restores the RNG. A flipped byte is then found, naming the file."""
    weights = torch.randn(64, 8, dtype=torch.float64)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 5, {"model": {"w": weights}}, {"mine": [1, 2]})
    after_save = torch.rand(3)
    assert path == tmp_path / "step_0000005" and sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005"]
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["mine"] == [1, 2] and state["step"] == 5 and state["world_size"] == 1 and len(state["rng"]) == 1
    data_files = sorted(p.name for p in path.iterdir() if p.name != "trainer_state.json")
    assert sorted(state["files"]) == sorted(state["sha256"]) == data_files and ".metadata" in data_files
    for name in data_files:
        content = (path / name).read_bytes()
        assert state["files"][name] == len(content) and state["sha256"][name] == hashlib.sha256(content).hexdigest()
    assert checkpoint_problem(path) is None and find_checkpoint(tmp_path) == (path, [])

    into = {"model": {"w": torch.zeros(64, 8, dtype=torch.float64)}}
    torch.manual_seed(0)
    assert load_checkpoint(path, into)["mine"] == [1, 2]
    assert torch.equal(into["model"]["w"], weights) and torch.equal(torch.rand(3), after_save)

    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 1
    shard.write_bytes(bytes(content))
    assert checkpoint_problem(path).startswith(f"{shard.name} has other bytes than were written")
    assert checkpoint_problem(path, checksums=False) is None
    again = save_checkpoint(tmp_path, 5, {"model": {"w": weights}}, {})  # a damaged checkpoint of a step is replaced
    assert again == path and checkpoint_problem(path) is None


def test_each_rank_checksums_its_share_of_the_files(tmp_path):
    """__<r>_<n>.distcp is rank r's (modulo the world size), the rest rank 0's; sizes are checked on every rank."""
    assert [file_owner(n, 2) for n in (".metadata", "__0_0.distcp", "__1_0.distcp", "__3_1.distcp")] == [0, 0, 1, 1]
    assert file_owner("__4_0.distcp", 3) == 1
    path = fake_checkpoint(tmp_path, 1, {".metadata": b"m", "__0_0.distcp": b"abc", "__1_0.distcp": b"xyz"})
    (path / "__1_0.distcp").write_bytes(b"xyw")
    assert checkpoint_problem(path, 0, 2) is None
    assert "__1_0.distcp has other bytes" in checkpoint_problem(path, 1, 2)
    assert checkpoint_problem(path, 1, 2, checksums=False) is None
    (path / "__1_0.distcp").write_bytes(b"xy")
    assert "__1_0.distcp has 2 bytes, 3 were written" in checkpoint_problem(path, 0, 2)


def test_prune_counts_only_intact_checkpoints_up_to_the_newest(tmp_path):
    """The issue's repro at unit level: keep=1 after saving 10, with 12 damaged (skipped at resume: flipped bytes)
    and a garbage 99 beside it, keeps 10 and leaves 12 and 99 alone; older intact ones go, damaged old ones stay."""
    for n in (2, 4, 8, 10, 12):
        fake_checkpoint(tmp_path, n, {".metadata": b"m", "__0_0.distcp": b"abc"})
    (tmp_path / "step_0000004" / "__0_0.distcp").write_bytes(b"ab")  # damaged: not counted, not deleted
    (tmp_path / "step_0000099").mkdir()
    deleted = prune_checkpoints(tmp_path, 10, 1, skipped=[tmp_path / "step_0000012"])
    assert [p.name for p in deleted] == ["step_0000008", "step_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000010", "step_0000012", "step_0000099"]
    assert prune_checkpoints(tmp_path, 10, 0, skipped=[]) == []  # keep=0: all


def test_prune_refuses_a_negative_or_non_integer_keep_before_deleting_anything(tmp_path):
    fake_checkpoint(tmp_path, 10, {".metadata": b"m", "__0_0.distcp": b"abc"})
    with pytest.raises(ValueError, match="keep must be >= 0, got -1"):
        prune_checkpoints(tmp_path, 10, -1, skipped=[])
    with pytest.raises(TypeError, match=r"keep must be an int, got float \(1.0\)"):
        prune_checkpoints(tmp_path, 10, 1.0, skipped=[])
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000010"]  # the only checkpoint is still there




def test_run_dir_lock_refuses_a_live_holder_and_takes_over_stale_locks(tmp_path, caplog):
    """One holder at a time; a lock left by a process that is gone (or whose pid now runs another program) is
    taken over with a warning; a holder on another host is refused with how to remove its lock."""
    first = RunDirLock(tmp_path)
    first.acquire()
    lock_file = tmp_path / "run.lock"
    holder = json.loads(lock_file.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirInUse, match=rf"is in use by another run: process {os.getpid()} on host "):
        RunDirLock(tmp_path).acquire()
    first.release()
    assert not lock_file.exists() and sorted(p.name for p in tmp_path.iterdir()) == []

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for stale in ({**holder, "pid": int(gone.stdout)},  # a process that has exited
                  {**holder, "process_start": "1"}):  # this pid, but another process start: the pid was reused
        lock_file.write_text(json.dumps(stale))
        lock = RunDirLock(tmp_path)
        lock.acquire()
        assert json.loads(lock_file.read_text()) == lock.holder
        assert "taking over the stale lock" in caplog.records[-1].getMessage()
        lock.release()

    for elsewhere in ({"host": "elsewhere"}, {"pid_namespace": "pid:[1]"}):  # another host or another container
        lock_file.write_text(json.dumps({**holder, "pid": int(gone.stdout), **elsewhere}))
        with pytest.raises(RunDirInUse, match=f"process {gone.stdout.strip()} on host .*if it is no longer "
                                                      f"running .* delete {lock_file}"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).release()  # not this process's lock: left alone
    assert json.loads(lock_file.read_text())["pid_namespace"] == "pid:[1]"




def test_locked_run_dir_without_a_process_group(tmp_path):
    with locked_run_dir(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirInUse, match="is in use by another run"), locked_run_dir(tmp_path):
            pass
    assert not (tmp_path / "run.lock").exists()
