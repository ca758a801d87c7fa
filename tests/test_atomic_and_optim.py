import math

import pytest
import torch
from torch import nn

from letkit.atomic import atomic_directory, atomic_write, atomic_write_json
from letkit.hardware import datasheet_peaks
from letkit.optim import warmup_cosine_lr, weight_decay_groups


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def fail_halfway(f):
        f.write(b'{"step": 2')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail_halfway)
    assert path.read_text() == '{\n  "step": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_directory_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "a").write_text("partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("done")
    assert (final / "a").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_warmup_cosine_lr():
    kw = dict(peak_lr=2.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [warmup_cosine_lr(s, **kw) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert warmup_cosine_lr(4, **kw) == 2.0
    assert warmup_cosine_lr(9, **kw) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert warmup_cosine_lr(14, **kw) == pytest.approx(0.2) and warmup_cosine_lr(100, **kw) == pytest.approx(0.2)


def test_weight_decay_groups_split_matrices_from_vectors():
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)
    decay, no_decay = weight_decay_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[1].weight), id(model[2].bias)}
    torch.optim.AdamW(weight_decay_groups(model.parameters(), 0.1))  # a valid AdamW argument


def test_datasheet_peaks_prefer_the_specific_name():
    assert datasheet_peaks("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert datasheet_peaks("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert datasheet_peaks("NVIDIA H200")[1:] == (989e12, 4.8e12)
    assert datasheet_peaks("cpu") is None


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_replace_directory_interrupted_between_its_renames_loses_nothing(tmp_path, monkeypatch):
    import os

    from letkit.atomic import remove_stale_temporaries, replace_directory

    final, new = tmp_path / "export", tmp_path / ".tmp-export-1-new"
    final.mkdir()
    (final / "weights").write_text("old")
    new.mkdir()
    (new / "weights").write_text("new")
    real_rename, renames = os.rename, []

    def crash_on_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_directory(new, final)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not final.exists()
    retired = renames[0][1]
    dead = retired.with_name(retired.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    real_rename(retired, dead)  # as if the interrupted process had exited
    remove_stale_temporaries(tmp_path, recursive=False)
    assert (final / "weights").read_text() == "old"  # the old directory is back, not deleted

    replace_directory(new, final)
    assert (final / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
