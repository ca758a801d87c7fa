"""examples/pretrain_fsdp.py under torchrun: 2 CPU ranks (gloo), the tiny config, a few steps."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, models, pre_tokenizers

from letkit.data import tokenize_corpus
from letkit.models import count_parameters, from_preset, load_pretrained
from letkit import same_tokenizer

EXAMPLE = Path(__file__).parents[1] / "examples" / "pretrain_fsdp.py"
STEPS, S_STOP = 12, 6  # the tiny config: 12 steps, the teacher released at step 6, checkpoints every 4 steps
ALL_CHECKPOINTS = [f"step_{s:07d}" for s in range(2, STEPS + 1, 2)]  # the full run checkpoints every 2 steps


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_fsdp", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tokenized corpus with learnable structure: each word is mostly followed by the next one in a cycle."""
    root = tmp_path_factory.mktemp("corpus")
    words = [f"w{i}" for i in range(40)]
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    rng = random.Random(0)
    lines = []
    for _ in range(400):
        i = rng.randrange(40)
        doc = []
        for _ in range(rng.randint(20, 60)):
            doc.append(words[i])
            i = (i + 1) % 40 if rng.random() < 0.9 else rng.randrange(40)
        lines.append(" ".join(doc))
    (root / "corpus.txt").write_text("\n".join(lines))
    tokenize_corpus([root / "corpus.txt"], root / "shards", root / "tokenizer.json", shard_tokens=4000, num_workers=1)
    return root / "shards"


def run_example(run_dir, shards, *args, ranks=2):
    """The example on the tiny config, under torchrun with ``ranks`` CPU ranks (``ranks=None``: plain python).

    ``--standalone`` binds the rendezvous store to port 0 and the workers share it: no free port is picked
    and released first, so none can be taken by another process in between. The rendezvous timeouts are
    raised far above their defaults (60 s store reads), for a machine loaded by other jobs."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                                         "--rdzv-conf", "join_timeout=900,read_timeout=600"]
    command = [sys.executable, *launcher, str(EXAMPLE), "--config", "tiny", "--data.path", str(shards),
               "--train.run_dir", str(run_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def torchrun(run_dir, shards, *args):
    result = run_example(run_dir, shards, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def metrics(run_dir):
    """Per-step records (the last one written for a step wins) and the events of a run's metrics.jsonl."""
    steps, events = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            events.append(record)
        else:
            steps[record["step"]] = record
    return steps, events


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    output = torchrun(run_dir, shards, "--checkpoint.every", "2")
    return run_dir, output


def test_trains_aligns_until_s_stop_then_drops_the_teacher(full_run):
    run_dir, output = full_run
    steps, events = metrics(run_dir)
    assert sorted(steps) == list(range(1, STEPS + 1))
    lm = [steps[s]["lm_loss"] for s in range(1, STEPS + 1)]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.3, lm
    for s in range(1, STEPS + 1):  # step s ran at schedule step s - 1
        assert (steps[s]["align_loss"] is not None) == (s <= S_STOP), steps[s]
        assert (steps[s]["lambda_"] > 0) == (s <= S_STOP)
        if s > S_STOP:
            assert steps[s]["loss"] == steps[s]["lm_loss"]
    assert steps[1]["loss"] == pytest.approx(steps[1]["lm_loss"] + 0.5 * steps[1]["align_loss"], rel=1e-6)
    released = [e for e in events if e["event"] == "teacher_released"]
    assert [e["step"] for e in released] == [S_STOP]
    assert "teacher released, memory" in output
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ALL_CHECKPOINTS
    assert not (run_dir / "run.lock").exists()  # released at the end


def test_stop_and_resume_reproduces_the_uninterrupted_run_across_s_stop(full_run, shards, tmp_path):
    full_dir, _ = full_run
    torchrun(tmp_path, shards, "--train.stop_at", "3")  # before S_stop; the checkpoint at 3 is the last one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]
    output = torchrun(tmp_path, shards, "--checkpoint.keep", "1")
    assert "resumed from" in output and "step_0000003" in output
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000012"]  # older ones pruned
    want, _ = metrics(full_dir)
    got, events = metrics(tmp_path)
    assert [e["step"] for e in events if e["event"] == "resume"] == [3]
    for s in range(1, STEPS + 1):
        for key in ("loss", "lm_loss", "align_loss", "lambda_", "lr", "grad_norm"):
            assert got[s][key] == want[s][key], (s, key)


def test_a_non_finite_loss_stops_the_run_before_it_is_checkpointed(shards, tmp_path):
    """Checkpoint steps check the loss even when they are not log steps, so no NaN weights are ever saved."""
    result = run_example(tmp_path, shards, "--optim.lr", "1e30", "--log.every", "100", "--checkpoint.every", "1")
    found = re.search(r"FloatingPointError: loss is (nan|inf|-inf) at step (\d+)", result.stderr)
    assert result.returncode != 0 and found, result.stderr[-3000:]
    nan_step = int(found.group(2))
    assert nan_step < STEPS  # stopped at the first bad checkpoint step, not at the next log step (the last one)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved and saved[-1] == f"step_{nan_step - 1:07d}"


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def resumed_after_damage(full_run, shards, tmp_path_factory):
    """Checkpoints 2-6 of the full run intact; 8 with a truncated shard, 10 with bytes flipped in DCP's .metadata
    and 12 in a shard (sizes unchanged), 16 interrupted (.tmp), 99 garbage. Resumed with a teacher path that does
    not exist (after S_stop the teacher must not be loaded), to step 10, saving every 2 steps and keeping 2."""
    full_dir, _ = full_run
    run_dir = tmp_path_factory.mktemp("damaged")
    for name in ALL_CHECKPOINTS:
        shutil.copytree(full_dir / "checkpoints" / name, run_dir / "checkpoints" / name)
    shard = run_dir / "checkpoints" / "step_0000008" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    flip_byte(run_dir / "checkpoints" / "step_0000010" / ".metadata", 100)
    flip_byte(run_dir / "checkpoints" / "step_0000012" / "__1_0.distcp", 5000)
    shutil.copytree(full_dir / "checkpoints" / "step_0000012", run_dir / "checkpoints" / "step_0000016.tmp")
    (run_dir / "checkpoints" / "step_0000099").mkdir()
    (run_dir / "checkpoints" / "step_0000099" / "notes.txt").write_text("not a checkpoint")
    output = torchrun(run_dir, shards, "--teacher.path", "/does/not/exist", "--train.steps", str(STEPS),
                      "--train.stop_at", "10", "--checkpoint.every", "2", "--checkpoint.keep", "2")
    return run_dir, output


def test_damaged_checkpoints_are_skipped_and_the_run_falls_back_to_an_intact_one(full_run, resumed_after_damage):
    """Size changes, flipped bytes in a shard or in DCP's .metadata (a bare AssertionError before checksums),
    interrupted saves and garbage folders: each is skipped with a warning naming it, and the run resumes from
    the newest intact checkpoint (6), repeating the uninterrupted run exactly."""
    run_dir, output = resumed_after_damage
    ckpt = run_dir / "checkpoints"
    assert f"WARNING skipping incomplete checkpoint {ckpt / 'step_0000016.tmp'}" in output
    assert f"WARNING skipping damaged checkpoint {ckpt / 'step_0000099'}: " in output
    assert (f"WARNING skipping damaged checkpoint {ckpt / 'step_0000012'}: __1_0.distcp has other bytes than were "
            "written") in output
    assert f"WARNING skipping damaged checkpoint {ckpt / 'step_0000010'}: .metadata has other bytes" in output
    assert f"WARNING skipping damaged checkpoint {ckpt / 'step_0000008'}: __1_0.distcp has " in output
    _, events = metrics(run_dir)
    assert [e["step"] for e in events if e["event"] == "resume"] == [6]
    want, _ = metrics(full_run[0])
    got, _ = metrics(run_dir)
    assert sorted(got) == [7, 8, 9, 10]
    assert all(got[s]["loss"] == want[s]["loss"] for s in got)


def test_retention_keeps_the_newest_intact_checkpoints_and_never_counts_damaged_ones(resumed_after_damage):
    """checkpoint.keep=2 counts intact checkpoints up to the one just saved: 8 and 10 (this run's) stay, the older
    2, 4, 6 go; the skipped 12 and the garbage 99 neither count nor are deleted. Before the fix every step_N
    folder counted, so saving 8 and 10 deleted every intact checkpoint and kept 12 and 99."""
    run_dir, _ = resumed_after_damage
    ckpt = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["step_0000008", "step_0000010", "step_0000012", "step_0000016.tmp", "step_0000099"]
    newest, skipped = load_example().find_checkpoint(ckpt)
    assert newest == ckpt / "step_0000010" and skipped == [ckpt / "step_0000099", ckpt / "step_0000012"]


def test_retention_repro_from_the_issue_keeps_the_checkpoint_it_just_saved(full_run, shards, tmp_path):
    """Issue #15's repro: without step 10, with a truncated shard in 12 and a garbage 99, a rerun to step 10 with
    checkpoint.keep=1 resumes from 8 and saves 10. Before the fix every step_N folder counted, so it deleted 10 (and
    all intact ones) and kept 99, and the next run started from step 1."""
    for name in ALL_CHECKPOINTS:
        if name != "step_0000010":
            shutil.copytree(full_run[0] / "checkpoints" / name, tmp_path / "checkpoints" / name)
    shard = tmp_path / "checkpoints" / "step_0000012" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    (tmp_path / "checkpoints" / "step_0000099").mkdir()
    torchrun(tmp_path, shards, "--checkpoint.keep", "1", "--train.stop_at", "10", "--checkpoint.every", "2")
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_0000010", "step_0000012", "step_0000099"]
    assert load_example().find_checkpoint(ckpt)[0] == ckpt / "step_0000010"


def test_resume_after_s_stop_does_not_load_the_teacher(resumed_after_damage):
    run_dir, output = resumed_after_damage
    assert "LET is over, the teacher is not loaded" in output
    steps, events = metrics(run_dir)
    assert all(r["align_loss"] is None for r in steps.values())
    assert not [e for e in events if e["event"] == "teacher_released"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_exported_model_is_the_last_checkpoint_with_the_data_tokenizer(full_run, shards):
    run_dir, _ = full_run
    exported = load_pretrained(run_dir / "final_model")
    assert exported.family == "llama"
    state = {"model": {f"model.{k}": torch.empty_like(v, dtype=torch.float32) for k, v in exported.model.state_dict().items()}}
    dcp.load(state, checkpoint_id=run_dir / "checkpoints" / "step_0000012", no_dist=True)
    for name, value in exported.model.state_dict().items():
        assert torch.equal(value, state["model"][f"model.{name}"].bfloat16()), name
    data_tokenizer = Tokenizer.from_file(str(shards / "tokenizer.json"))  # exported with the model
    assert exported.tokenizer is not None and same_tokenizer(exported.tokenizer, data_tokenizer)


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
    example = load_example()
    assert example.find_checkpoint(tmp_path / "none") == (None, [])
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
    found, skipped = example.find_checkpoint(tmp_path)
    assert found == good and [p.name for p in skipped] == [f"step_{n:07d}" for n in range(7, 1, -1)]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 7 and all(w.startswith("skipping ") for w in warnings)
    assert "(its save was interrupted)" in warnings[0]
    assert ".metadata has other bytes than were written" in warnings[1]
    assert "__1_0.distcp has other bytes than were written" in warnings[2]
    assert "Expecting property name" in warnings[3] and ".metadata" in warnings[4]
    assert "__0_0.distcp has 2 bytes, 3 were written" in warnings[5] and "trainer_state.json says step 7" in warnings[6]

    # written before checksums (and tokens_per_step) were recorded: sizes checked, resumed with a warning
    old = fake_checkpoint(tmp_path, 9, {".metadata": b"m", "__0_0.distcp": b"abc"})
    (old / "__0_0.distcp").write_bytes(b"abd")  # same size: not detectable without a checksum
    state = json.loads((old / "trainer_state.json").read_text())
    del state["sha256"]
    state.update(world_size=2, config={"data": {"micro_batch_size": 2, "grad_accum": 2, "seq_len": 32}})
    (old / "trainer_state.json").write_text(json.dumps(state))
    assert example.find_checkpoint(tmp_path) == (old, [])
    cfg = example.load_config(["--config", "tiny"])
    with example.MetricsLog(tmp_path / "run", cfg, enabled=True) as log:
        example.report_resume(log, old, state, 2, 256, cfg.data)
    assert "records no checksums (an older version of this script wrote it)" in caplog.records[-1].getMessage()
    [resume] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert resume["checkpoint_tokens_per_step"] == 256 and resume["tokens_per_step"] == 256


def test_each_rank_checksums_its_share_of_the_files(tmp_path):
    """__<r>_<n>.distcp is rank r's (modulo the world size), the rest rank 0's; sizes are checked on every rank."""
    example = load_example()
    assert [example.file_owner(n, 2) for n in (".metadata", "__0_0.distcp", "__1_0.distcp", "__3_1.distcp")] == [0, 0, 1, 1]
    assert example.file_owner("__4_0.distcp", 3) == 1
    path = fake_checkpoint(tmp_path, 1, {".metadata": b"m", "__0_0.distcp": b"abc", "__1_0.distcp": b"xyz"})
    (path / "__1_0.distcp").write_bytes(b"xyw")
    assert example.checkpoint_problem(path, 0, 2) is None
    assert "__1_0.distcp has other bytes" in example.checkpoint_problem(path, 1, 2)
    assert example.checkpoint_problem(path, 1, 2, checksums=False) is None
    (path / "__1_0.distcp").write_bytes(b"xy")
    assert "__1_0.distcp has 2 bytes, 3 were written" in example.checkpoint_problem(path, 0, 2)


def test_prune_counts_only_intact_checkpoints_up_to_the_newest(tmp_path):
    """The issue's repro at unit level: keep=1 after saving 10, with 12 damaged (skipped at resume: flipped bytes)
    and a garbage 99 beside it, keeps 10 and leaves 12 and 99 alone; older intact ones go, damaged old ones stay."""
    example = load_example()
    for n in (2, 4, 8, 10, 12):
        fake_checkpoint(tmp_path, n, {".metadata": b"m", "__0_0.distcp": b"abc"})
    (tmp_path / "step_0000004" / "__0_0.distcp").write_bytes(b"ab")  # damaged: not counted, not deleted
    (tmp_path / "step_0000099").mkdir()
    deleted = example.prune_checkpoints(tmp_path, 10, 1, skipped=[tmp_path / "step_0000012"])
    assert [p.name for p in deleted] == ["step_0000008", "step_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000010", "step_0000012", "step_0000099"]
    assert example.prune_checkpoints(tmp_path, 10, 0, skipped=[]) == []  # keep=0: all


@pytest.mark.parametrize("preset, billions", [("1.4b", 1.36), ("7b", 6.74)])
def test_large_configs_build_on_meta_with_expected_parameter_counts(preset, billions):
    example = load_example()
    cfg = example.load_config(["--config", preset])
    assert cfg.model.preset == preset and cfg.train.mixed_precision == "bf16"
    assert cfg.train.activation_checkpointing and cfg.train.compile
    with torch.device("meta"):
        model = from_preset(cfg.model.preset, vocab_size=32000)
    c = model.config
    d, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_block = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d  # qkv, o, gate/up/down, two RMSNorms
    want = c.num_hidden_layers * per_block + 2 * c.vocab_size * d + d
    assert count_parameters(model) == want
    assert round(want / 1e9, 2) == billions  # Pythia-1.4B shape / Llama-2-7B's published 6.74B
    assert all(p.is_meta for p in model.parameters())
    # 6N (matmul params: all but the input embedding) + 12 * L * d * T attention FLOPs per token
    t = cfg.data.seq_len
    want_flops = 6 * (want - c.vocab_size * d) + 12 * c.num_hidden_layers * d * t
    assert example.flops_per_token(model, t) == want_flops


def test_config_overrides_help_and_errors(tmp_path, capsys):
    example = load_example()
    cfg = example.load_config(["--config", "tiny", "--train.steps", "7", "--train.compile", "true", "--optim.lr", "1e-4"])
    assert (cfg.train.steps, cfg.train.compile, cfg.optim.lr, cfg.teacher.stop_step) == (7, True, 1e-4, S_STOP)
    with pytest.raises(SystemExit):
        example.load_config(["--help"])
    help_text = capsys.readouterr().out
    assert "--teacher.stop_step INT" in help_text and "--data.micro_batch_size INT" in help_text
    assert f"a .toml path (default: {example.DEFAULT_CONFIG})" in " ".join(help_text.split())
    with pytest.raises(ValueError, match="no such file"):
        example.load_config(["--config", "13b"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ValueError, match="unknown key 'stepz' in \\[train\\]"):
        example.load_config(["--config", str(bad)])
    bad.write_text("[train]\nsteps = '3'\n")
    with pytest.raises(ValueError, match="\\[train\\] steps = '3' should be a int"):
        example.load_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="train.mixed_precision must be one of \\('bf16', 'fp32'\\), got 'fp16'"):
        example.load_config(["--config", "tiny", "--train.mixed_precision", "fp16"])
    with pytest.raises(ValueError, match="data.grad_accum must be positive, got 0"):
        example.load_config(["--config", "tiny", "--data.grad_accum", "0"])
    with pytest.raises(ValueError, match="teacher.alignment must be one of \\('same', 'last', 'mean'\\), got 'first'"):
        example.load_config(["--config", "tiny", "--teacher.alignment", "first"])
    with pytest.raises(ValueError, match=r"teacher.projector must be one of \('interpolate', 'linear', 'mlp'\)"):
        example.load_config(["--config", "tiny", "--teacher.projector", "conv"])
    with pytest.raises(ValueError, match="teacher.layer_map='L2E,X2Y': unknown layer mapping strategy 'X2Y'"):
        example.load_config(["--config", "tiny", "--teacher.layer_map", "L2E,X2Y"])
    assert example.load_config(["--config", "tiny", "--teacher.schedule", "exponential"]).teacher.schedule == "exponential"
    with pytest.raises(ValueError, match="teacher.schedule='step' cannot be built .*step_size"):
        example.load_config(["--config", "tiny", "--teacher.schedule", "step"])
    with pytest.raises(SystemExit):
        example.load_config(["--config", "tiny", "--train.compile", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.fixture
def world_of_one():
    """An in-process gloo process group of one rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # no port to race for
    yield
    dist.destroy_process_group()


def test_gradients_are_reduced_once_per_optimizer_step(world_of_one, monkeypatch):
    """With grad accumulation, reduce-scatter runs in the last micro-step only (target and sharded projector)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    example = load_example()
    cfg = example.load_config(["--config", "tiny", "--teacher.projector", "linear"])
    mesh, device = init_device_mesh("cpu", (1,)), torch.device("cpu")
    model = example.build_target(cfg, 64, mesh, device)
    teacher = example.build_teacher(cfg.teacher.path, 64, device, 0, seq_len=8)
    schedule = example.SCHEDULES["linear"](0.5, 6)
    objective = example.build_objective(cfg, model, teacher, schedule, mesh, device)
    assert not objective.loss_fn.check_finite  # no host-device sync per step; the loop checks the logged loss
    trainable = torch.nn.ModuleDict({"model": model, "projector": objective.projector})
    groups = {name: m for name, m in trainable.named_modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_groups}
    assert len(groups) == 4 and "projector.projectors.0" in groups  # 2 blocks, the root (embeddings, head), the projector
    reductions = []
    original = param_group.foreach_reduce

    def counting(*args, **kwargs):
        reductions.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(param_group, "foreach_reduce", counting)
    optimizer, lr_scheduler = example.build_optimizer(cfg.optim, trainable, 10, device)
    loader = example.RandomTokens(64, 8, 2, 0, 0)
    result = example.train_step(model, objective, trainable, optimizer, lr_scheduler, schedule, loader, step=0,
                                grad_accum=3, grad_clip=1.0, device=device)
    assert result.has_align and torch.isfinite(result.losses).all() and result.lambda_ == 0.5
    assert len(reductions) == len(groups)  # one per FSDP parameter group, not one per micro-step
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_teacher_must_match_the_data(shards, tmp_path):
    """letkit.check_teacher_compatibility, wired to this script's settings: tokenizer identity (index.json's SHA-256,
    or same_tokenizer on the data's copy), the DATA's vocabulary (not the padded model's), seq_len <= the teacher's
    max_position_embeddings, a tokenizer for cross-tokenizer LET, all before the weights load."""
    from letkit.models import save_pretrained

    example = load_example()
    data_tokenizer = Tokenizer.from_file(str(shards / "tokenizer.json"))
    sha = json.loads((shards / "index.json").read_text())["tokenizer_sha256"]
    vocab = data_tokenizer.get_vocab_size()

    def teacher_dir(name, vocab_size, tokenizer, max_positions=64):
        with torch.device("meta"):
            model = from_preset("tiny", vocab_size=vocab_size, max_position_embeddings=max_positions)
        model.to_empty(device="cpu")
        model.init_weights()
        return save_pretrained(model, tmp_path / name, tokenizer=tokenizer)

    def build(path, seq_len=32, data_file=shards / "tokenizer.json", data_vocab=vocab):
        return example.build_teacher(str(path), data_vocab, torch.device("cpu"), 0, seq_len=seq_len,
                                     data_tokenizer_sha256=sha, data_tokenizer_file=data_file)

    # the same tokenizer, saved compactly (other bytes than the data's file): accepted via same_tokenizer
    same = teacher_dir("same", vocab, data_tokenizer)
    assert (same / "tokenizer.json").read_bytes() != (shards / "tokenizer.json").read_bytes()
    assert build(same).num_layers == 2
    with pytest.raises(ValueError, match=f"of the teacher .*same.* has SHA-256 .*, but the data was tokenized with one "
                                         f"of SHA-256 {sha}"):
        build(same, data_file=None)  # only the SHA-256 to go by

    other = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1, **{f"x{i}": i + 2 for i in range(40)}}, "<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match=r"the teacher .*other.* tokenizes differently from the data .* or use "
                                         r"cross-tokenizer LET \(--teacher.alignment last or mean\)"):
        build(teacher_dir("other", vocab, other))

    no_tokenizer = teacher_dir("small", vocab - 1, None)
    with pytest.raises(ValueError, match=f"has {vocab - 1} token embeddings, fewer than the data's vocabulary of {vocab}"):
        build(no_tokenizer)
    # the check uses the data's vocabulary: a target padded to 64 does not make a 42-token teacher fail
    assert build(teacher_dir("exact", vocab, None)).num_layers == 2
    with pytest.raises(ValueError, match=r"data.seq_len=65 is longer than the teacher .*short.* supports "
                                         r"\(max_position_embeddings=64\): use data.seq_len <= 64"):
        build(teacher_dir("short", vocab, None), seq_len=65)
    with pytest.raises(ValueError, match=r"data.seq_len=40 is longer than the teacher 'random:tiny,max_position_embeddings=39'"):
        example.build_teacher("random:tiny,max_position_embeddings=39", vocab, torch.device("cpu"), 0, seq_len=40)
    with pytest.raises(ValueError, match=r"cross-tokenizer LET \(--teacher.alignment last or mean\) re-tokenizes the "
                                         r"text for the teacher, but the teacher 'random:tiny' has no tokenizer"):
        example.build_teacher("random:tiny", vocab, torch.device("cpu"), 0, seq_len=32, alignment="last",
                              data_tokenizer_file=shards / "tokenizer.json")


def test_restore_lambda_schedule_rules(tmp_path):
    example = load_example()
    cfg = example.load_config(["--config", "tiny"])  # linear, lambda0 0.5, S_stop 6
    saved = example.SCHEDULES["linear"](0.5, 6)
    for _ in range(4):
        saved.step()
    state = {"step": 4, "lambda_schedule": saved.state_dict(), "config": {"teacher": dataclasses.asdict(cfg.teacher)}}
    schedule = example.SCHEDULES["linear"](0.5, 6)
    example.restore_lambda_schedule(schedule, cfg.teacher, state, tmp_path)
    assert schedule.current_step == 4 and not schedule.is_done()
    baseline = {"step": 9, "lambda_schedule": None, "config": {}}  # a checkpoint of a run without a teacher
    example.restore_lambda_schedule(schedule, cfg.teacher, baseline, tmp_path)
    assert schedule.current_step == 9 and schedule.is_done()

    changed = example.load_config(["--config", "tiny", "--teacher.stop_step", "8", "--teacher.schedule", "cosine"])
    with pytest.raises(ValueError, match=r"cannot resume from .*: this run's lambda schedule differs .*teacher.schedule: "
                                         r"checkpoint 'linear', config 'cosine'; teacher.stop_step: checkpoint 6, config 8\)"):
        example.restore_lambda_schedule(example.SCHEDULES["cosine"](0.5, 8), changed.teacher, state, tmp_path)
    no_config = {**state, "config": {}}  # the schedule's own check (letkit's LambdaSchedule.load_state_dict)
    with pytest.raises(ValueError, match="cannot resume from .*stop_step: saved 6 vs 8"):
        example.restore_lambda_schedule(example.SCHEDULES["linear"](0.5, 8), changed.teacher, no_config, tmp_path)
    with pytest.raises(ValueError, match="trainer_state.json has step 5 but lambda schedule step 4"):
        example.restore_lambda_schedule(example.SCHEDULES["linear"](0.5, 6), cfg.teacher, {**state, "step": 5}, tmp_path)


def test_resume_with_a_changed_lambda_schedule_fails_before_loading_the_teacher(full_run, shards, tmp_path):
    full_dir, _ = full_run
    shutil.copytree(full_dir / "checkpoints" / "step_0000008", tmp_path / "checkpoints" / "step_0000008")
    result = run_example(tmp_path, shards, "--teacher.stop_step", "10")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "teacher.stop_step: checkpoint 6, config 10" in output
    assert "layers, pairs (teacher, target)" not in output  # the teacher was not loaded


@pytest.mark.parametrize("projector, compile", [("linear", "true")])
def test_sharded_projector_and_compile_train_and_resume_exactly(shards, tmp_path, projector, compile):
    """The learned projector is fully_shard-ed like the target: it trains, is checkpointed, and a run resumed
    from step 4 (before S_stop, so the projector is still in use) repeats the uninterrupted run exactly."""
    options = ["--teacher.projector", projector, "--train.compile", compile, "--checkpoint.export", "false"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    output = torchrun(full_dir, shards, *options)
    assert f"projector {projector}" in output
    want, _ = metrics(full_dir)
    lm = [want[s]["lm_loss"] for s in range(1, STEPS + 1)]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.3, lm
    assert all(want[s]["align_loss"] is not None for s in range(1, S_STOP + 1))
    metadata = dcp.FileSystemReader(str(full_dir / "checkpoints" / "step_0000004")).read_metadata()
    assert any(key.startswith("model.projector.") for key in metadata.state_dict_metadata)
    shutil.copytree(full_dir / "checkpoints" / "step_0000004", resumed_dir / "checkpoints" / "step_0000004")
    output = torchrun(resumed_dir, shards, *options)
    assert "resumed from" in output
    got, _ = metrics(resumed_dir)
    assert sorted(got) == list(range(5, STEPS + 1))
    for s in got:
        for key in ("loss", "lm_loss", "align_loss", "grad_norm"):
            assert got[s][key] == want[s][key], (s, key)


def test_cross_tokenizer_let_with_a_teacher_of_another_tokenizer(shards, tmp_path):
    """--teacher.alignment last: a teacher whose tokenizer splits 'w12' into 'w', '1', '2' reads its own tokens of
    each window's text; training aligns until S_stop, then drops the teacher (and the re-tokenizing thread)."""
    from letkit.models import save_pretrained

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "w": 2, **{str(d): d + 3 for d in range(10)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    with torch.device("meta"):
        teacher = from_preset("tiny", vocab_size=len(vocab), max_position_embeddings=64)
    teacher.to_empty(device="cpu")
    teacher.init_weights()
    save_pretrained(teacher, tmp_path / "teacher", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"but the data was tokenized with one of SHA-256 {'0' * 64}"):  # without teacher.alignment
        load_example().build_teacher(str(tmp_path / "teacher"), 42, torch.device("cpu"), 0, seq_len=32,
                                     data_tokenizer_sha256="0" * 64)
    run_dir = tmp_path / "run"
    torchrun(run_dir, shards, "--teacher.path", str(tmp_path / "teacher"), "--teacher.alignment", "last",
             "--checkpoint.export", "false", "--checkpoint.every", "0")
    steps, events = metrics(run_dir)
    lm = [steps[s]["lm_loss"] for s in range(1, STEPS + 1)]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.3, lm
    for s in range(1, STEPS + 1):
        assert (steps[s]["align_loss"] is not None) == (s <= S_STOP)
    align = [steps[s]["align_loss"] for s in range(1, S_STOP + 1)]
    assert all(0 < a < 2 for a in align) and align[-1] < align[0], align
    assert [e["step"] for e in events if e["event"] == "teacher_released"] == [S_STOP]


def test_run_dir_lock_refuses_a_live_holder_and_takes_over_stale_locks(tmp_path, caplog):
    """One holder at a time; a lock left by a process that is gone (or whose pid now runs another program) is
    taken over with a warning; a holder on another host is refused with how to remove its lock."""
    example = load_example()
    first = example.RunDirLock(tmp_path)
    first.acquire()
    lock_file = tmp_path / "run.lock"
    holder = json.loads(lock_file.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(example.RunDirInUse, match=rf"is in use by another run: process {os.getpid()} on host "):
        example.RunDirLock(tmp_path).acquire()
    first.release()
    assert not lock_file.exists() and sorted(p.name for p in tmp_path.iterdir()) == []

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for stale in ({**holder, "pid": int(gone.stdout)},  # a process that has exited
                  {**holder, "process_start": "1"}):  # this pid, but another process start: the pid was reused
        lock_file.write_text(json.dumps(stale))
        lock = example.RunDirLock(tmp_path)
        lock.acquire()
        assert json.loads(lock_file.read_text()) == lock.holder
        assert "taking over the stale lock" in caplog.records[-1].getMessage()
        lock.release()

    for elsewhere in ({"host": "elsewhere"}, {"pid_namespace": "pid:[1]"}):  # another host or another container
        lock_file.write_text(json.dumps({**holder, "pid": int(gone.stdout), **elsewhere}))
        with pytest.raises(example.RunDirInUse, match=f"process {gone.stdout.strip()} on host .*if it is no longer "
                                                      f"running .* delete {lock_file}"):
            example.RunDirLock(tmp_path).acquire()
    example.RunDirLock(tmp_path).release()  # not this process's lock: left alone
    assert json.loads(lock_file.read_text())["pid_namespace"] == "pid:[1]"


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_holder(shards, tmp_path):
    """A live run (here a sleeping process that holds the lock) keeps a second one out: every rank exits with
    the holder's pid and host, before anything is trained or written."""
    holder = subprocess.Popen([sys.executable, "-c", f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("pretrain_fsdp", {str(EXAMPLE)!r})
example = importlib.util.module_from_spec(spec); sys.modules[spec.name] = example; spec.loader.exec_module(example)
example.RunDirLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(600)
""", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = run_example(tmp_path, shards)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert result.stderr.count(f"is in use by another run: process {holder.pid} on host {socket.gethostname()!r}") >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_resume_on_another_world_size_is_logged_and_recorded(full_run, shards, tmp_path):
    """A 2-rank checkpoint resumed by one process halves the tokens per step: a warning says so (and how to keep
    the global batch), and the resume record in metrics.jsonl has both world sizes and both batch sizes."""
    shutil.copytree(full_run[0] / "checkpoints" / "step_0000008", tmp_path / "checkpoints" / "step_0000008")
    result = run_example(tmp_path, shards, "--checkpoint.every", "0", "--checkpoint.export", "false", ranks=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("was written by 2 ranks at 256 tokens per step; this run has 1 ranks and 128 tokens per step" in result.stdout
            and "--data.grad_accum 4 keeps the checkpoint's 256" in result.stdout)
    steps, events = metrics(tmp_path)
    [resume] = [e for e in events if e["event"] == "resume"]
    assert resume == {"event": "resume", "step": 8, "checkpoint": str(tmp_path / "checkpoints" / "step_0000008"),
                      "world_size": 1, "tokens_per_step": 128, "checkpoint_world_size": 2,
                      "checkpoint_tokens_per_step": 256}
    assert sorted(steps) == [9, 10, 11, 12] and steps[12]["tokens_seen"] == 8 * 256 + 4 * 128


def test_tensorboard_and_wandb_sinks_get_the_step_records(tmp_path, monkeypatch):
    """Step records' numbers go to TensorBoard scalars and to W&B (a stand-in module: wandb is not a test
    dependency) beside metrics.jsonl; events stay in metrics.jsonl; a rerun continues the same W&B run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name == "wandb" else find_spec(name, *args))
    example = load_example()
    cfg = example.load_config(["--config", "tiny", "--log.tensorboard", "true", "--log.wandb", "true"])
    for _ in range(2):
        with example.MetricsLog(tmp_path, cfg, enabled=True) as log:
            log.step(1, loss=2.5, align_loss=None, lambda_=0.5)
            log.event("checkpoint", 1, path="x")
            log.step(2, loss=2.25, align_loss=0.75, lambda_=0.25)
    with example.MetricsLog(tmp_path / "other", cfg, enabled=False) as log:  # ranks > 0 write nothing
        log.step(1, loss=1.0)
    assert not (tmp_path / "other").exists()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[:3] == [{"step": 1, "loss": 2.5, "align_loss": None, "lambda_": 0.5},
                         {"event": "checkpoint", "step": 1, "path": "x"},
                         {"step": 2, "loss": 2.25, "align_loss": 0.75, "lambda_": 0.25}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/align_loss", "train/lambda_", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.25)] * 2
    assert [(e.step, e.value) for e in events.Scalars("train/align_loss")] == [(2, 0.75)] * 2

    inits = [c[1] for c in calls if c[0] == "init"]
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert len(inits) == 2 and all(i["id"] == run_id and i["resume"] == "allow" for i in inits)
    assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(tmp_path) and inits[0]["project"] == "letkit"
    assert inits[0]["config"]["log"]["wandb"] is True
    assert calls[1:4] == [("log", {"loss": 2.5, "lambda_": 0.5}, 1), ("log", {"loss": 2.25, "align_loss": 0.75,
                                                                               "lambda_": 0.25}, 2), ("finish",)]


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_missing_sink_package_is_named_with_its_pip_install(sink, monkeypatch):
    monkeypatch.setitem(sys.modules, sink, None)  # as if not installed: find_spec finds nothing
    example = load_example()
    with pytest.raises(ValueError, match=f"log.{sink}=true needs the {sink} package, which is not installed: "
                                         f"pip install {sink}"):
        example.load_config(["--config", "tiny", f"--log.{sink}", "true"])
