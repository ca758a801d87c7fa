"""examples/pretrain_fsdp.py under torchrun: 2 CPU ranks (gloo), the tiny config, a few steps."""

import dataclasses
import importlib.util
import inspect
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tokenizers import Tokenizer, models, pre_tokenizers

import letkit
from letkit import same_tokenizer
from letkit.checkpointing import find_checkpoint
from letkit.data import ShardedTokenLoader, tokenize_corpus
from letkit.models import count_parameters, from_preset, load_pretrained

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


def metrics(run_dir, evaluations=False):
    """Per-step records (the last one written for a step wins) and the events of a run's metrics.jsonl; with
    ``evaluations``, also the evaluation records' values by step."""
    steps, events, evals = {}, [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            events.append(record)
        elif "eval" in record:
            evals[record["step"]] = record["eval"]
        else:
            steps[record["step"]] = record
    return (steps, events, evals) if evaluations else (steps, events)


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
    newest, skipped = find_checkpoint(ckpt)
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
    assert find_checkpoint(ckpt)[0] == ckpt / "step_0000010"


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


def test_a_checkpoint_without_checksums_is_resumed_with_a_warning(tmp_path, caplog):
    """Written before checksums (and tokens_per_step) were recorded: find_checkpoint checks its sizes only, and the
    resume says so; the tokens per step come from its config."""
    example = load_example()
    state = {"step": 9, "world_size": 2, "config": {"data": {"micro_batch_size": 2, "grad_accum": 2, "seq_len": 32}}}
    cfg = example.load_config(["--config", "tiny"])
    with example.MetricsLog(tmp_path / "run", cfg, enabled=True) as log:
        example.report_resume(log, tmp_path / "step_0000009", state, 2, 256, cfg.data)
    assert "records no checksums (an older version of this script wrote it)" in caplog.records[-1].getMessage()
    [resume] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert resume["checkpoint_tokens_per_step"] == 256 and resume["tokens_per_step"] == 256


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
    with pytest.raises(ValueError, match=r"teacher.schedule='step' cannot be built .*schedule_args='' \(its keyword "
                                         r"arguments: step_size, gamma, warmup_steps, hold_steps\).*step_size"):
        example.load_config(["--config", "tiny", "--teacher.schedule", "step"])
    with pytest.raises(ValueError, match=r"teacher.schedule_args: 'gamma' is not key=value"):
        example.load_config(["--config", "tiny", "--teacher.schedule", "step", "--teacher.schedule_args", "gamma"])
    with pytest.raises(ValueError, match=r"teacher.schedule='linear' cannot be built .*'gamma'"):
        example.load_config(["--config", "tiny", "--teacher.schedule_args", "gamma=0.5"])
    with pytest.raises(SystemExit):
        example.load_config(["--config", "tiny", "--train.compile", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(letkit.SCHEDULES))
def test_every_schedule_of_letkit_is_accepted_with_its_constructor_arguments(name):
    """--teacher.schedule takes any name in letkit.SCHEDULES (no list of its own) and --teacher.schedule_args its
    keyword arguments; the help lists each schedule's."""
    example = load_example()
    keyword_only = {p.name: p for p in inspect.signature(letkit.SCHEDULES[name]).parameters.values()
                    if p.kind is p.KEYWORD_ONLY}
    args = {key: 2 for key, p in keyword_only.items() if p.default is p.empty}  # e.g. step's step_size
    args["warmup_steps"] = 1
    text = ",".join(f"{k}={v}" for k, v in args.items())
    cfg = example.load_config(["--config", "tiny", "--teacher.schedule", name, "--teacher.schedule_args", text])
    schedule = example.build_schedule(cfg.teacher)
    assert type(schedule) is letkit.SCHEDULES[name] and schedule.stop_step == S_STOP and schedule.lambda0 == 0.5
    assert all(getattr(schedule, key) == value for key, value in args.items())
    assert schedule(0) == 0.0 and schedule(1) == 0.5  # the warmup argument took effect
    assert f"{name}: {', '.join(keyword_only)}" in example.TeacherConfig.__dataclass_fields__["schedule_args"].metadata["help"]


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
    def refuse(*args, **kwargs):
        raise AssertionError("building the objective ran the teacher")

    teacher.model.forward = refuse  # the objective is sized from the models' configs
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # no deprecated argument (target_block_list)
        objective = example.build_objective(cfg, model, teacher, schedule, mesh)
    del teacher.model.forward
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
    result = example.train_step(model, objective, trainable, optimizer, lr_scheduler, loader, step=3, grad_accum=3,
                                grad_clip=1.0, device=device)
    assert result.has_align and torch.isfinite(result.losses).all() and result.lambda_ == 0.5 * (6 - 3) / 6
    assert schedule.current_step == 3  # the step given is the one counter: train_step does not advance another
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
    # one step counter: trainer_state.json's step (the training loop's), whatever the saved schedule state says
    schedule = example.SCHEDULES["linear"](0.5, 6)
    example.restore_lambda_schedule(schedule, cfg.teacher, {**state, "step": 5}, tmp_path)
    assert schedule.current_step == 5


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


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_holder(shards, tmp_path):
    """A live run (here a sleeping process that holds the lock) keeps a second one out: every rank exits with
    the holder's pid and host, before anything is trained or written."""
    holder = subprocess.Popen([sys.executable, "-c", """
import sys, time
from letkit.checkpointing import RunDirLock
RunDirLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(600)
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
    """Step and evaluation records' numbers go to TensorBoard scalars (train/..., eval/...) and to W&B (a stand-in
    module: wandb is not a test dependency; eval/...) beside metrics.jsonl; events stay in metrics.jsonl; a rerun
    continues the same W&B run."""
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
            log.evaluation(2, {"val_loss": 3.5, "task/acc": 0.25})
    with example.MetricsLog(tmp_path / "other", cfg, enabled=False) as log:  # ranks > 0 write nothing
        log.step(1, loss=1.0)
    assert not (tmp_path / "other").exists()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[:4] == [{"step": 1, "loss": 2.5, "align_loss": None, "lambda_": 0.5},
                         {"event": "checkpoint", "step": 1, "path": "x"},
                         {"step": 2, "loss": 2.25, "align_loss": 0.75, "lambda_": 0.25},
                         {"step": 2, "eval": {"val_loss": 3.5, "task/acc": 0.25}}]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/task/acc", "eval/val_loss", "train/align_loss", "train/lambda_",
                                                "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [(2, 3.5)] * 2
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.25)] * 2
    assert [(e.step, e.value) for e in events.Scalars("train/align_loss")] == [(2, 0.75)] * 2

    inits = [c[1] for c in calls if c[0] == "init"]
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert len(inits) == 2 and all(i["id"] == run_id and i["resume"] == "allow" for i in inits)
    assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(tmp_path) and inits[0]["project"] == "letkit"
    assert inits[0]["config"]["log"]["wandb"] is True
    assert calls[1:5] == [("log", {"loss": 2.5, "lambda_": 0.5}, 1), ("log", {"loss": 2.25, "align_loss": 0.75,
                                                                               "lambda_": 0.25}, 2),
                          ("log", {"eval/val_loss": 3.5, "eval/task/acc": 0.25}, 2), ("finish",)]


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_a_missing_sink_package_is_named_with_its_pip_install(sink, monkeypatch):
    monkeypatch.setitem(sys.modules, sink, None)  # as if not installed: find_spec finds nothing
    example = load_example()
    with pytest.raises(ValueError, match=f"log.{sink}=true needs the {sink} package, which is not installed: "
                                         f"pip install {sink}"):
        example.load_config(["--config", "tiny", f"--log.{sink}", "true"])


def next_word_task(path, items=12):
    """A local multiple-choice task on the corpus's cycle: after three consecutive words, the next one."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(items):
            i = rng.randrange(40)
            gold = f"w{(i + 3) % 40}"
            choices = [gold, *rng.sample([f"w{j}" for j in range(40) if f"w{j}" != gold], 3)]
            rng.shuffle(choices)
            context = " ".join(f"w{(i + k) % 40}" for k in range(3))
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(gold)}) + "\n")
    return path


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_in_loop_evaluation_of_held_out_loss_and_lm_eval_scores(shards, tmp_path, monkeypatch):
    """--eval.every 8 on 12 steps evaluates at 8 and 12 (the last step): the validation loss over the last 16 token
    windows of the shards, held out of training, equals a float64 recomputation from the step-12 checkpoint; a local
    JSONL task is scored by lm-evaluation-harness on rank 0 from a temporary export (gone afterwards). Both go to
    metrics.jsonl and TensorBoard, and the training loss is that of a run without evaluation."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'letkit[eval]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no hub here: the local JSON task must not need one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = next_word_task(tmp_path / "next_word.jsonl")
    run_dir = tmp_path / "run"
    torchrun(run_dir, shards, "--eval.every", "8", "--eval.windows", "16", "--eval.task_files", str(task),
             "--eval.limit", "8", "--checkpoint.every", "12", "--checkpoint.export", "false", "--log.tensorboard", "true")
    steps, _, evals = metrics(run_dir, evaluations=True)
    assert sorted(evals) == [8, 12] and sorted(steps) == list(range(1, STEPS + 1))
    assert all(0.0 <= e["local_next_word/acc"] <= 1.0 for e in evals.values()), evals
    assert evals[12]["val_loss"] < evals[8]["val_loss"], evals
    assert not list(run_dir.glob(".tmp-*"))  # the temporary exports are removed

    vocab = json.loads((shards / "index.json").read_text())["vocab_size"]
    model = from_preset("tiny", vocab_size=vocab).double()
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=run_dir / "checkpoints" / "step_0000012", no_dist=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    held_out = next(ShardedTokenLoader(shards, seq_len=32, batch_size=16, shuffle=False, windows=slice(-16, None)))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(held_out[:, :-1]).flatten(0, 1), held_out[:, 1:].flatten())
    assert evals[12]["val_loss"] == pytest.approx(want.item(), rel=1e-5)

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [(s, pytest.approx(evals[s]["val_loss"]))
                                                                           for s in (8, 12)]
    assert "eval/local_next_word/acc" in events.Tags()["scalars"]
    assert json.loads((run_dir / "checkpoints" / "step_0000012" / "trainer_state.json").read_text())["held_out_windows"] == 16


def test_evaluation_settings_are_checked_before_training(shards, tmp_path, monkeypatch):
    """Bad evaluation settings are refused up front, naming the field; a resume that would hold out other windows
    (so train on other data) than the checkpoint's run is refused with the settings that resume it."""
    example = load_example()
    base = ["--config", "tiny", "--data.path", str(shards)]
    with pytest.raises(ValueError, match=r"eval.tasks='arc_easy' / eval.task_files='' are scored every eval.every "
                                         r"steps, but eval.every=0"):
        example.load_config([*base, "--eval.tasks", "arc_easy"])
    with pytest.raises(ValueError, match=r"eval.every=4 evaluates on token windows held out of data.path, but "
                                         r"data.path='random:256' is random tokens"):
        example.load_config(["--config", "tiny", "--eval.every", "4"])
    with pytest.raises(ValueError, match="eval.windows must be positive, got 0"):
        example.load_config([*base, "--eval.every", "4", "--eval.windows", "0"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "w1", "choices": ["w2"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=rf"task file '{re.escape(str(bad))}', line 1: \"choices\" must be a list"):
        example.load_config([*base, "--eval.every", "4", "--eval.task_files", str(bad)])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ValueError, match=r"eval.tasks='arc_easy' needs the lm_eval package, which is not installed: "
                                         r"pip install 'letkit\[eval\]'"):
        example.load_config([*base, "--eval.every", "4", "--eval.tasks", "arc_easy"])
    monkeypatch.delitem(sys.modules, "lm_eval")

    cfg = example.load_config([*base, "--eval.every", "4", "--eval.windows", "3"])
    with pytest.raises(ValueError, match=r"eval.windows=3 is less than one micro-batch per rank \(2 ranks x "
                                         r"data.micro_batch_size=2\): hold out at least 4"):
        example.build_data(cfg, 0, 2)
    data = example.build_data(cfg, 0, 1)  # one rank validates on whole micro-batches: 2 of the 3 held-out windows
    all_windows = ShardedTokenLoader(shards, seq_len=32, batch_size=2).num_windows
    assert data.validation.shape == (2, 33) and data.loader.num_windows == all_windows - 3
    checkpoint = tmp_path / "step_0000008"
    example.check_held_out(cfg, {"held_out_windows": 3}, checkpoint)
    with pytest.raises(ValueError, match=rf"cannot resume from {checkpoint}: its run held out the last 0 token windows "
                                         r"for validation, this one would hold out 3 .* Resume with --eval.every 0"):
        example.check_held_out(cfg, {}, checkpoint)  # a checkpoint of a run without evaluation
    no_eval = example.load_config(base)
    with pytest.raises(ValueError, match=r"held out the last 3 .* would hold out 0 .* --eval.every N --eval.windows 3"):
        example.check_held_out(no_eval, {"held_out_windows": 3}, checkpoint)
