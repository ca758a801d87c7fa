"""``letkit demo``: the whole pipeline at toy size, its statistics, its cache and its errors on bad input."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import operator
import os
import re
import shutil
import sys
import sysconfig
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import letkit.demo as demo
from letkit import LETObjective, LogitDistillation, TeacherFeatureExtractor
from letkit.atomic import remove_stale_temporaries
from letkit.cli import build_parser, demo_config_from_args, main
from letkit.demo import (
    DemoConfig,
    DemoError,
    EvalPoint,
    LETSettings,
    ModelShape,
    RunResult,
    TrainSchedule,
    compare_runs,
    crossing,
    mean_ci95,
    t_critical_95,
)
from letkit.models import from_preset, save_pretrained

STDLIB_FILES = ("abc.py", "bisect.py", "colorsys.py", "keyword.py", "numbers.py")


def make_corpus(directory: Path) -> Path:
    """A small slice of the real default corpus: five standard-library modules (~40 KB)."""
    directory.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_FILES:
        shutil.copy(stdlib / name, directory / name)
    return directory


def tiny_config(tmp: Path, corpus: Path, **overrides) -> DemoConfig:
    config = DemoConfig(
        teacher_shape=ModelShape(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        teacher_schedule=TrainSchedule(steps=24, batch_size=8, lr=3e-3, warmup_steps=4),
        target_shape=ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        target_schedule=TrainSchedule(steps=16, batch_size=4, lr=3e-3, warmup_steps=2),
        let=LETSettings(lambda0=1.0, stop_fraction=0.5),
        seq_len=32, eval_every=4, eval_sequences=8, corpus=str(corpus), vocab_size=320,
        cache_dir=str(tmp / "cache"), out_dir=str(tmp / "out"), threads=1, progress=False,
    )
    return dataclasses.replace(config, **overrides)


def cache_files(tmp: Path) -> list[Path]:
    root = tmp / "cache"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    config = tiny_config(tmp, make_corpus(tmp / "corpus"), seeds=2)
    threads = torch.get_num_threads()
    metrics = demo.run_demo(config, log=lambda m: None)
    assert torch.get_num_threads() == threads  # run_demo's --threads does not leak into the caller
    return tmp, config, metrics


def test_demo_writes_consistent_metrics(demo_run):
    tmp, config, metrics = demo_run
    on_disk = json.loads((tmp / "out" / "metrics.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp / "out" / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert on_disk["summary"] == json.loads(json.dumps(metrics["summary"]))
    assert on_disk["config"]["target_schedule"]["steps"] == 16
    assert metrics["data"]["train_tokens"] > 10 * metrics["data"]["val_tokens"] > 0
    teacher = metrics["teacher"]
    assert not teacher["provided"] and not teacher["cached"] and teacher["pretrain_seconds"] > 0
    assert metrics["target"]["size_ratio"] == pytest.approx(
        metrics["target"]["non_embedding_parameters"] / teacher["non_embedding_parameters"])
    assert metrics["target"]["stop_step"] == 8
    assert [r["seed"] for r in metrics["runs"]] == [0, 1]
    for run in metrics["runs"]:
        base, let = run["baseline"], run["let"]
        for r in (base, let):
            steps = [p["step"] for p in r["curve"]]
            assert steps == [0, 4, 8, 12, 16]
            seconds = [p["seconds"] for p in r["curve"]]
            assert seconds[0] == 0 and all(a < b for a, b in zip(seconds, seconds[1:]))
            assert r["final_val_loss"] == r["curve"][-1]["val_loss"]
            assert r["final_perplexity"] == pytest.approx(math.exp(r["final_val_loss"]))
        # same initial weights: identical loss before the first step; LET's lambda is 0 after S_stop
        assert base["curve"][0]["val_loss"] == let["curve"][0]["val_loss"]
        assert let["curve"][2]["weights"]["let"] > 0 and let["curve"][-1]["weights"] == {"let": 0.0}
        assert all(p["weights"] == {} for p in base["curve"])
        assert 0 < let["teacher_forward_seconds"] < let["train_seconds"]
        to_result = lambda d: RunResult("x", [EvalPoint(**p) for p in d["curve"]], d["steps"], d["train_seconds"], 0.0)
        assert run["comparison"] == compare_runs(to_result(base), to_result(let))
    speedups = [r["comparison"]["step_speedup"] for r in metrics["runs"]]
    assert metrics["summary"]["step_speedup"] == mean_ci95(speedups)
    for run in metrics["runs"]:  # on this idle-or-not machine both wall-clock measures are reported
        assert run["comparison"]["wall_speedup_load_matched"] > 0 and run["comparison"]["wall_speedup"] > 0
    assert metrics["method"] == "let" and metrics["target"]["kd_stop_step"] is None
    report = demo.format_report(metrics)
    assert "step speedup" in report and "95% CI" in report and "raw wall-clock speedup" in report
    assert "method: LET vs the baseline (LET lambda0 1, S_stop 8 (L2E, interpolate))" in report


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_demo_plot_is_a_png(demo_run):
    tmp, _, metrics = demo_run
    assert metrics["plot"] == str(tmp / "out" / "demo.png")
    assert (tmp / "out" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(demo_run, tmp_path, monkeypatch):
    _, _, metrics = demo_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert demo.plot_curves(metrics, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_cached_teacher_is_reused_and_reloads_with_identical_features(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"))
    data = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)
    saved = []
    real_save = save_pretrained
    monkeypatch.setattr("letkit.demo.teacher.save_pretrained",
                        lambda model, path, **kw: saved.append(model) or real_save(model, path, **kw))
    info = demo.pretrain_teacher(config, data, tmp_path / "cache", log=lambda m: None)
    assert not info.cached and len(saved) == 1
    again = demo.pretrain_teacher(config, data, tmp_path / "cache", log=lambda m: None)
    assert again.cached and again.path == info.path and again.val_loss == info.val_loss and len(saved) == 1
    assert sorted(p.name for p in Path(info.path).iterdir()) == [
        "config.json", "generation_config.json", demo.TEACHER_INFO_FILE, "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]

    reloaded = TeacherFeatureExtractor.from_pretrained(info.path, layers=[0, -1])
    original = TeacherFeatureExtractor(saved[0], layers=[0, -1])
    ids = torch.randint(0, data.vocab_size, (3, 17))
    for got, want in zip(reloaded(ids), original(ids)):
        assert torch.equal(got, want)
    assert reloaded.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    # a second prepare_data reads the cached tokenizer and tokens and gives the same data
    cached = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)
    assert torch.equal(cached.train, data.train) and torch.equal(cached.val, data.val) and cached.key == data.key


def test_interrupt_during_teacher_pretraining_leaves_cache_consistent(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"))
    argv = ["demo", "--quick", "--threads", "1", "--corpus", config.corpus, "--cache-dir", config.cache_dir,
            "--out", config.out_dir, "--no-progress"]
    calls = []
    real_lr_at = TrainSchedule.lr_at

    def interrupted_lr_at(self, step):  # called once per training step
        calls.append(step)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_lr_at(self, step)

    monkeypatch.setattr(TrainSchedule, "lr_at", interrupted_lr_at)
    assert main(argv + ["--vocab-size", "320"]) == 130
    assert "interrupted" in capsys.readouterr().err
    names = [p.relative_to(tmp_path / "cache").parts[0] for p in cache_files(tmp_path)]
    assert set(names) == {"tokenizers", "data"}  # complete entries only: no teacher, no temporaries
    assert not list((tmp_path / "cache").rglob("*tmp*"))
    monkeypatch.setattr(TrainSchedule, "lr_at", real_lr_at)
    data = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)
    info = demo.pretrain_teacher(config, data, tmp_path / "cache", log=lambda m: None)
    assert not info.cached and Path(info.path, "model.safetensors").is_file()


def test_interrupt_while_saving_the_teacher_and_stale_temporaries(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), teacher_schedule=TrainSchedule(2, 2, 1e-3, 0))
    data = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)

    def crash(model, path, **kw):
        Path(path, "config.json").write_text("{")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr("letkit.demo.teacher.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.pretrain_teacher(config, data, tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "cache" / "teachers").exists() or not any((tmp_path / "cache" / "teachers").iterdir())

    # leftovers of a killed process (pid that no longer runs) are removed; a live process's are kept
    dead = tmp_path / "cache" / "teachers" / ".tmp-abc-999999999-x1y2"
    alive = tmp_path / "cache" / "teachers" / f".tmp-abc-{os.getpid()}-x1y2"
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path / "cache") == [dead]
    assert alive.exists() and not dead.exists()


@pytest.fixture
def one_thread():
    """One torch thread, as run_demo uses with threads=1 (two on the shared 2-core machine are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stage_api_with_an_auxiliary_objective_of_ones_own(tmp_path, one_thread):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), teacher_schedule=TrainSchedule(4, 4, 3e-3, 0))
    prepared = demo.prepare(config, log=lambda m: None)
    data, teacher = prepared.data, prepared.teacher
    assert not teacher.provided and Path(teacher.path, "model.safetensors").is_file()
    assert prepared.teacher_tokenizer.get_vocab() == data.tokenizer.get_vocab()  # one shared vocabulary

    class Penalty:
        """A toy method: 0.5 * w^2 on a parameter of its own, to check the trainer's contract."""

        name = "penalty"
        teacher_forward_seconds = teacher_tokenize_seconds = 0.0
        aligned_fraction = None

        def __init__(self):
            self.w, self.lambda_, self.calls = torch.nn.Parameter(torch.ones(())), 0.0, []

        def parameters(self):
            return iter([self.w])

        def __call__(self, step, inputs, logits, loss):
            self.calls.append((step, tuple(inputs.shape), tuple(logits.shape), loss.item()))
            self.lambda_ = 0.5
            return loss + self.lambda_ * self.w**2

    penalty = Penalty()
    runs = [demo.target_run(config, data, 0, name="baseline"),
            demo.target_run(config, data, 0, name="LET", let=config.let, teacher_path=teacher.path),
            demo.RunSpec("penalty", demo.build_model(config.target_shape, data.vocab_size, config.seq_len, 0), [penalty])]
    assert runs[0].objectives == [] and isinstance(runs[1].objectives[0], demo.LETAlignment)
    baseline, let, own = demo.train_lockstep(runs, data, config.target_schedule, seq_len=config.seq_len, data_seed=0,
                                             eval_every=config.eval_every, eval_sequences=config.eval_sequences,
                                             progress=False)
    steps, batch = config.target_schedule.steps, config.target_schedule.batch_size
    assert [c[0] for c in penalty.calls] == list(range(steps))
    assert {c[1:3] for c in penalty.calls} == {((batch, config.seq_len), (batch, config.seq_len, data.vocab_size))}
    assert penalty.calls[0][3] == pytest.approx(math.log(data.vocab_size), rel=0.1)  # it received the NLL
    assert 0 < penalty.w.item() < 1  # its parameter trained alongside the model's
    assert own.curve[-1].weights == {"penalty": 0.5} and baseline.curve[-1].weights == {}
    assert let.curve[1].weights["let"] > 0 and let.teacher_forward_seconds > 0 == baseline.teacher_forward_seconds
    assert [p.step for p in own.curve] == [p.step for p in baseline.curve] == [0, 4, 8, 12, 16]
    assert set(demo.compare_runs(baseline, let)) >= {"step_speedup", "wall_speedup", "reached"}


# --------------------------------------------------------------------------------------------------------------------
# The paper's other methods: logit distillation from the same teacher (SALT, RKD) and LET+SALT
# --------------------------------------------------------------------------------------------------------------------


def test_method_settings():
    let, kd = demo.LETSettings(lambda0=2.0, stop_fraction=0.5), demo.KDSettings(weight=0.3, temperature=2.0,
                                                                                   stop_fraction=0.2)
    assert demo.method_settings("let", let, kd) == (let, None)
    assert demo.method_settings("salt", let, kd) == (None, kd)
    assert demo.method_settings("rkd", let, kd) == (None, demo.KDSettings(0.3, 2.0, 1.0))  # distils the whole run
    assert demo.method_settings("let+salt", let, kd) == (let, kd)
    assert kd.stop_step(100) == 20 and demo.KDSettings(stop_fraction=0.001).stop_step(100) == 1
    assert set(demo.METHODS) == set(demo.METHOD_LABELS)
    with pytest.raises(DemoError, match=r"method must be one of \('let', 'salt', 'rkd', 'let\+salt'\), got 'kd'"):
        demo.method_settings("kd", let, kd)
    with pytest.raises(DemoError, match="method must be one of"):
        tiny_config(Path("unused"), Path("unused"), method="kd").validate()


def record_calls(monkeypatch, objective_class) -> list[dict]:
    """Every call of ``objective_class``'s forward: the step, its output and whether it was finished afterwards."""
    calls = []
    real_forward = objective_class.forward

    def forward(self, input_ids, **kwargs):
        out = real_forward(self, input_ids, **kwargs)
        calls.append({"step": kwargs["step"], "out": out, "finished": self.finished})
        return out

    monkeypatch.setattr(objective_class, "forward", forward)
    return calls


@pytest.mark.parametrize("method", ["salt", "rkd", "let+salt"])
def test_each_method_adds_its_terms_exactly_while_their_schedules_run(demo_run, method, monkeypatch, one_thread):
    _, demo_config, _ = demo_run
    config = dataclasses.replace(demo_config, method=method, seeds=1)
    prepared = demo.prepare(config, log=lambda m: None)  # the teacher cached by demo_run
    data, steps = prepared.data, config.target_schedule.steps
    let, kd = demo.method_settings(method, config.let, config.kd)
    spec = demo.target_run(config, data, 0, name=method, let=let, kd=kd, teacher_path=prepared.teacher.path)
    assert [type(o) for o in spec.objectives] == ([demo.LETAlignment] if let else []) + [demo.DistillationTerm]
    teacher_models = {o.name: weakref.ref(o.objective.teacher.model) for o in spec.objectives}
    assert teacher_models["kd"]() is not teacher_models.get("let", lambda: None)()  # each term has its own teacher
    kd_calls, let_calls = record_calls(monkeypatch, LogitDistillation), record_calls(monkeypatch, LETObjective)
    baseline, run = demo.train_lockstep([demo.target_run(config, data, 0, name="baseline"), spec], data,
                                        config.target_schedule, seq_len=config.seq_len, data_seed=0,
                                        eval_every=config.eval_every, eval_sequences=config.eval_sequences,
                                        progress=False)

    stops = {"kd": kd.stop_step(steps), "let": let.stop_step(steps) if let else None}
    assert stops["kd"] == {"salt": 4, "rkd": 16, "let+salt": 4}[method]  # 25% of 16 steps, or all of them
    for name, calls in (("kd", kd_calls), ("let", let_calls)):
        if stops[name] is None:
            assert calls == []
            continue
        assert [c["step"] for c in calls] == list(range(steps))
        term = [c["out"].distill_loss if name == "kd" else c["out"].align_loss for c in calls]
        assert [t is not None for t in term] == [s < stops[name] for s in range(steps)]
        assert all(t > 0 for t in term if t is not None)
        # the teacher is released at the first step past its schedule, not before
        assert [c["finished"] for c in calls] == [s >= stops[name] for s in range(steps)]
        gc.collect()
        assert (teacher_models[name]() is None) == (stops[name] < steps)  # its memory is freed, not just unhooked
    if kd.stop_fraction == 1.0:
        assert not spec.objectives[-1].objective.finished  # RKD distils until the run's last step
    for point in run.curve[1:]:  # each term's weight at the step before the evaluation
        assert point.weights["kd"] == (kd.weight if point.step - 1 < stops["kd"] else 0.0)
        assert ("let" in point.weights) == (let is not None)
    assert all(p.weights == {} for p in baseline.curve)
    assert run.curve[0].val_loss == baseline.curve[0].val_loss and run.final_val_loss != baseline.final_val_loss
    assert 0 < run.teacher_forward_seconds < run.train_seconds and baseline.teacher_forward_seconds == 0


def test_demo_with_let_and_salt_names_the_method_in_its_outputs(demo_run, tmp_path, capsys):
    _, demo_config, _ = demo_run
    out = tmp_path / "out"
    argv = ["demo", "--method", "let+salt", "--kd-weight", "0.25", "--kd-temperature", "2", "--kd-stop-step", "6"]
    args = build_parser().parse_args([*argv, "--quick"])
    config = demo_config_from_args(args)
    assert config.method == "let+salt" and config.kd == demo.KDSettings(0.25, 2.0, 6 / 300)
    config = dataclasses.replace(demo_config, method="let+salt", kd=demo.KDSettings(0.25, 2.0, 6 / 16), seeds=1,
                                 out_dir=str(out))
    metrics = demo.run_demo(config, log=lambda m: None)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["method"] == metrics["method"] == "let+salt" and on_disk["config"]["kd"]["temperature"] == 2.0
    assert metrics["target"]["stop_step"] == 8 and metrics["target"]["kd_stop_step"] == 6
    [run] = metrics["runs"]
    assert set(run) == {"seed", "baseline", "let+salt", "comparison"}
    assert run["let+salt"]["curve"][1]["weights"]["kd"] == 0.25 and run["let+salt"]["curve"][2]["weights"]["kd"] == 0
    report = demo.format_report(metrics)
    assert "LET+SALT val (ppl)" in report and "LET+SALT reaches baseline final" in report
    assert ("method: LET+SALT vs the baseline (LET lambda0 1, S_stop 8 (L2E, interpolate); KD weight 0.25, "
            "temperature 2, until step 6)") in report
    assert "LET+SALT's final val loss below the baseline's in" in report and "LET's" not in report
    if metrics["plot"]:
        assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crossing_is_interpolated_between_evaluations():
    curve = [EvalPoint(0, 0.0, 8.0, None), EvalPoint(10, 5.0, 6.0, 6.5), EvalPoint(20, 9.0, 4.0, 4.5)]
    assert crossing(curve, 5.0) == (15.0, 7.0)
    assert crossing(curve, 6.0) == (10.0, 5.0)
    assert crossing(curve, 3.9) is None
    assert crossing(curve, 9.0) == (0.0, 0.0)


def test_speedups_both_ways():
    def run(losses, seconds):
        points = [EvalPoint(10 * i, s, v, None) for i, (v, s) in enumerate(zip(losses, seconds))]
        return RunResult("r", points, 10 * (len(losses) - 1), seconds[-1], 0.0)

    baseline = run([8, 6, 5, 4.5, 4.0], [0, 10, 20, 30, 40])
    let = run([8, 5, 4.5, 4.0, 3.5], [0, 12, 24, 36, 48])
    c = compare_runs(baseline, let)
    assert c["reached"] and c["crossing_step"] == 30 and c["crossing_seconds"] == 36
    assert c["step_speedup"] == pytest.approx(40 / 30) and c["wall_speedup"] == pytest.approx(40 / 36)
    assert c["wall_speedup_load_matched"] == pytest.approx(40 / 36)  # the baseline's steps all cost the same
    # load that fell during the run: the baseline's first 30 steps took 35 of its 40 s
    early_load = run([8, 6, 5, 4.5, 4.0], [0, 20, 30, 35, 40])
    c = compare_runs(early_load, let)
    assert c["wall_speedup"] == pytest.approx(40 / 36)
    assert c["wall_speedup_load_matched"] == pytest.approx(40 / 30 * 35 / 36)
    assert c["final_val_loss_delta"] == pytest.approx(-0.5)
    # LET never reaches the baseline: speedups < 1, from where the baseline reaches LET's final loss (5.5 at step 15)
    worse = run([8, 7, 6.5, 6, 5.5], [0, 10, 20, 30, 40])
    c = compare_runs(baseline, worse)
    assert not c["reached"] and c["crossing_step"] is None
    assert c["step_speedup"] == pytest.approx(15 / 40) and c["wall_speedup"] == pytest.approx(15 / 40)
    assert c["wall_speedup_load_matched"] == pytest.approx(15 / 40)


def test_t_critical_values_and_confidence_interval():
    if importlib.util.find_spec("scipy") is not None:
        from scipy import stats

        for df in (1, 2, 3, 7, 30, 31, 45, 100, 1000):
            assert t_critical_95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1.5e-3)
    assert t_critical_95(2) == 4.303 and t_critical_95(30) == 2.042
    values = [t_critical_95(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:])) and 1.96 < values[-1] < 1.975
    stats_ = mean_ci95([1.0, 2.0, 3.0])
    assert stats_["mean"] == 2.0 and stats_["std"] == 1.0
    assert stats_["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])
    assert mean_ci95([1.5]) == {"n": 1, "mean": 1.5, "std": None, "ci95": None}
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci95([])
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical_95(0)


def test_pretokenized_corpus(tmp_path):
    tokens = (np.arange(5000) * 7919 % 500).astype(np.uint32)
    tokens.tofile(tmp_path / "tokens.bin")
    config = tiny_config(tmp_path, tmp_path / "tokens.bin", bin_dtype="uint32")
    data = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)
    assert data.tokenizer is None and data.vocab_size == 500
    assert torch.equal(torch.cat([data.train, data.val]), torch.from_numpy(tokens.astype(np.int64)))
    assert len(data.val) == 250
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int64))
    data_npy = demo.prepare_data(dataclasses.replace(config, corpus=str(tmp_path / "tokens.npy")), tmp_path / "cache")
    assert torch.equal(data_npy.train, data.train)
    assert cache_files(tmp_path) == []  # nothing to cache for a pre-tokenised corpus


def test_binary_files_in_a_directory_are_skipped(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (corpus / ".hidden").write_text("not read")
    messages = []
    loaded = demo.load_corpus(str(corpus), val_fraction=0.05, log=messages.append)
    assert "skipped 1 binary" in messages[0] and "image.png" in messages[0]
    text = "".join(loaded.train_docs + loaded.val_docs)
    assert "not read" not in text
    assert text == "".join((corpus / n).read_text() for n in sorted(STDLIB_FILES))
    globbed = demo.load_corpus(str(corpus / "*.py"), val_fraction=0.05, log=messages.append)
    assert globbed.key == loaded.key  # same documents, same names


def write_tokenizer(path: Path, text: str) -> Path:
    demo.train_bpe_tokenizer([text], 300).save(str(path))
    return path


def save_teacher(path: Path, vocab_size: int, tokenizer_text: str | None) -> Path:
    torch.manual_seed(0)
    model = from_preset("tiny", vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    tokenizer = demo.train_bpe_tokenizer([tokenizer_text], vocab_size) if tokenizer_text else None
    save_pretrained(model, path, tokenizer=tokenizer)
    return path


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    corpus = make_corpus(tmp / "corpus")
    (tmp / "empty_dir").mkdir()
    (tmp / "blank").mkdir()
    (tmp / "blank" / "a.txt").write_text("")
    (tmp / "blank" / "b.txt").write_text("\n  \n")
    (tmp / "small.txt").write_text("def f():\n    return 1\n")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "a.dat").write_bytes(bytes(range(256)))
    (tmp / "blob.txt").write_bytes(b"\xff\xfe\x00\x01" * 100)
    np.save(tmp / "matrix.npy", np.zeros((4, 4), dtype=np.int64))
    other_tok = write_tokenizer(tmp / "other_tokenizer.json", "zebra quagga okapi " * 200)
    teacher_other = save_teacher(tmp / "teacher_other_tok", 300, "lorem ipsum dolor sit amet " * 200)
    teacher_small = save_teacher(tmp / "teacher_small_vocab", 100, None)
    return [
        (["--corpus", str(tmp / "missing")], "does not exist"),
        (["--corpus", str(tmp / "empty_dir")], "contains no files"),
        (["--corpus", str(tmp / "blank")], "the corpus is empty"),
        (["--corpus", str(tmp / "nothing*.txt")], "matches no files"),
        (["--corpus", str(tmp / "small.txt")], "the corpus is too small"),
        (["--corpus", str(tmp / "bin")], "all 1 files are binary"),
        (["--corpus", str(tmp / "blob.txt")], "is not UTF-8 text"),
        (["--corpus", str(tmp / "matrix.npy")], "must hold a 1-D integer array"),
        (["--corpus", str(corpus), "--tokenizer", str(tmp / "missing.json")], "does not exist or is not a file"),
        (["--corpus", str(corpus), "--tokenizer", str(tmp / "small.txt")], "is not a tokenizers tokenizer.json"),
        (["--corpus", str(corpus), "--teacher", str(tmp / "missing_teacher")], "is not a checkpoint directory"),
        (["--corpus", str(corpus), "--teacher", str(teacher_other), "--tokenizer", str(other_tok)],
         "tokenizes differently from the data ("),
        (["--corpus", str(corpus), "--teacher", str(teacher_small), "--tokenizer", str(other_tok)],
         "has 100 token embeddings, fewer than the data's vocabulary of 273 tokens"),
        (["--corpus", str(corpus), "--teacher", str(teacher_small), "--tokenizer", str(other_tok), "--cross-tokenizer"],
         "has no tokenizer (tokenizer.json)"),
        (["--corpus", str(corpus), "--teacher", str(teacher_other)],
         f"seq_len=128 is longer than the teacher {str(teacher_other)!r} supports (max_position_embeddings=64)"),
        (["--corpus", str(tmp / "matrix.npy"), "--cross-tokenizer", "mean"], "must hold a 1-D integer array"),
        (["--corpus", str(corpus), "--teacher-vocab-size", "100"], "teacher_vocab_size must be >= 257"),
        (["--corpus", str(corpus), "--teacher-vocab-size", "300", "--teacher", str(teacher_other)],
         "cannot be combined with --teacher"),
        (["--corpus", str(corpus), "--stop-step", "0"], "--stop-step must be in 1 .."),
        (["--corpus", str(corpus), "--seeds", "0"], "seeds must be >= 1"),
        (["--corpus", str(corpus), "--threads", "-2"], "threads must be >= 1 (or unset for torch's choice), got -2"),
        (["--corpus", str(corpus), "--threads", "0"], "threads must be >= 1 (or unset for torch's choice), got 0"),
        (["--corpus", str(corpus), "--vocab-size", "10"],
         "vocab_size must be >= 257 (256 byte tokens and <|endoftext|>), got 10"),
        (["--corpus", str(corpus), "--target-layers", "0"], "--target-layers must be >= 1, got 0"),
        (["--corpus", str(corpus), "--method", "salt", "--kd-stop-step", "0"], "--kd-stop-step must be in 1 .."),
        (["--corpus", str(corpus), "--method", "rkd", "--kd-temperature", "0"],
         "logit distillation needs a finite weight >= 0, a finite temperature > 0"),
        (["--corpus", str(corpus), "--method", "salt", "--kd-weight", "-1"],
         "logit distillation needs a finite weight >= 0"),
        (["--corpus", str(corpus), "--method", "let+salt", "--cross-tokenizer"],
         "method 'let+salt' distils the teacher's logits into the target's over one shared vocabulary"),
        (["--corpus", str(corpus), "--method", "rkd", "--teacher-vocab-size", "300"],
         "it cannot be combined with cross-tokenizer LET"),
    ]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test as soon as any model starts training (every training step reads its learning rate)."""

    def lr_at(self, step):
        raise AssertionError("training started")

    monkeypatch.setattr(TrainSchedule, "lr_at", lr_at)


def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path, capsys, no_training):
    cases = bad_inputs(tmp_path)
    for args, message in cases:
        code = main(["demo", *args, "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.startswith("letkit demo: error: ") and message in err, (args, err)
        assert cache_files(tmp_path) == [], args
        assert not (tmp_path / "out").exists()
        if "--teacher" in args and "--tokenizer" in args and "--cross-tokenizer" not in args:
            assert "--cross-tokenizer" in err  # a teacher with another vocabulary: the error names the flag


def test_unwritable_out_is_refused_before_any_training(tmp_path, monkeypatch, capsys, no_training):
    corpus = make_corpus(tmp_path / "corpus")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    taken = tmp_path / "taken"
    (taken / "metrics.json").mkdir(parents=True)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: stand in for a read-only mount
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
            not (mode & os.W_OK and Path(path) == read_only) and real_access(path, mode, **kw)))
    cases = [
        (a_file, f"--out {str(a_file)!r} is an existing file; it must be a directory"),
        (a_file / "out", f"is below the file {str(a_file)!r}; it must be a directory"),
        (read_only, f"--out {str(read_only)!r} is not writable"),
        (read_only / "new" / "out", f"its parent {str(read_only)!r} is not writable"),
        (taken, f"{str(taken / 'metrics.json')!r} is a directory, where the demo writes a file"),
    ]
    for out, message in cases:
        code = main(["demo", "--quick", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("letkit demo: error: ") and message in err, (out, err)
        assert cache_files(tmp_path) == [], out  # stopped before the tokenizer, let alone any training
    assert a_file.read_text() == "keep me" and not any(read_only.iterdir())
    # a writable --out that does not exist yet passes, and is created only when the metrics are written
    demo.check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()


def test_a_corpus_too_small_for_the_bpe_vocabulary_is_reported(tmp_path):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), vocab_size=100_000)
    messages = []
    data = demo.prepare_data(config, tmp_path / "cache", log=messages.append)
    assert data.vocab_size < 100_000
    assert f"the corpus yields only {data.vocab_size} of the 100000 BPE tokens asked for" in "\n".join(messages)
    messages.clear()
    cached = demo.prepare_data(config, tmp_path / "cache", log=messages.append)  # the cached tokenizer: same note
    assert cached.vocab_size == data.vocab_size and any("yields only" in m for m in messages)


def test_library_errors_are_value_errors(tmp_path):
    assert issubclass(DemoError, ValueError)
    with pytest.raises(DemoError, match="does not exist"):
        demo.load_corpus(str(tmp_path / "nope"), val_fraction=0.05)
    with pytest.raises(DemoError, match="unknown preset"):
        demo.preset("huge")


def test_unreadable_corpus_file(tmp_path, monkeypatch, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "bisect.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert main(["demo", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot read corpus file" in err and "bisect.py" in err and "Permission denied" in err
    assert cache_files(tmp_path) == []


def test_cli_help_and_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--quick", "--corpus", "--teacher", "--tokenizer", "--seeds", "--cache-dir", "--out", "--lambda0",
                   "--cross-tokenizer", "--teacher-vocab-size", "--method", "--kd-stop-step"):
        assert option in help_text
    option_help = {entry.split()[0]: " ".join(entry.split()) for entry in re.split(r"\n  (?=-)", help_text)}
    for option, field in (("--eval-every", "eval_every"), ("--teacher-steps", "teacher_schedule.steps"),
                          ("--steps", "target_schedule.steps"), ("--seeds", "seeds"),
                          ("--target-layers", "target_shape.num_layers"), ("--method", "method"),
                          ("--kd-weight", "kd.weight"), ("--kd-temperature", "kd.temperature")):
        default, quick = (operator.attrgetter(field)(demo.PRESETS[name]) for name in ("default", "quick"))
        default, quick = (f"{v:g}" if isinstance(v, float) else v for v in (default, quick))
        shown = f"(default {default})" if default == quick else f"(default {default}, --quick {quick})"
        assert option_help[option].endswith(shown), option_help[option]
    args = build_parser().parse_args(["demo", "--quick", "--steps", "100", "--lambda0", "3", "--stop-step", "25",
                                      "--projector", "linear", "--lr", "1e-3", "--seeds", "3"])
    config = demo_config_from_args(args)
    assert config.target_schedule.steps == 100 and config.target_schedule.lr == 1e-3
    assert config.let.lambda0 == 3 and config.let.stop_step(100) == 25 and config.let.projector == "linear"
    assert config.seeds == 3 and config.teacher_shape == demo.PRESETS["quick"].teacher_shape
    assert demo.PRESETS["quick"].target_schedule.steps != 100  # presets are not modified
    layers = demo_config_from_args(build_parser().parse_args(["demo", "--target-layers", "3"]))
    assert layers.target_shape.num_layers == 3 and demo.PRESETS["default"].target_shape.num_layers == 6
    assert config.method == "let" and config.kd == demo.PRESETS["quick"].kd  # LET unless told otherwise
    assert "--kd-stop-step N" in help_text and "(default 25% of the steps; RKD always distils" in " ".join(help_text.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--method", "kd"])
    assert main([]) == 2
    assert config.alignment_mode is None and config.cross_tokenizer is None  # off by default
    cross = demo_config_from_args(build_parser().parse_args(["demo", "--cross-tokenizer"]))
    assert cross.cross_tokenizer == "last" == cross.alignment_mode
    mean = demo_config_from_args(build_parser().parse_args(["demo", "--cross-tokenizer", "mean"]))
    assert mean.alignment_mode == "mean"
    own = demo_config_from_args(build_parser().parse_args(["demo", "--teacher-vocab-size", "512"]))
    assert own.teacher_vocab_size == 512 and own.alignment_mode == "last"  # implies cross-tokenizer mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--cross-tokenizer", "first"])


# --------------------------------------------------------------------------------------------------------------------
# Cross-tokenizer LET
# --------------------------------------------------------------------------------------------------------------------


def record_objective_calls(monkeypatch) -> list[dict]:
    """Record every LETObjective call's teacher ids, alignment and output."""
    calls = []
    real_forward = LETObjective.forward

    def forward(self, input_ids, **kwargs):
        out = real_forward(self, input_ids, **kwargs)
        calls.append({"input_ids": input_ids, "teacher_input_ids": kwargs.get("teacher_input_ids"),
                      "token_alignment": kwargs.get("token_alignment"), "out": out})
        return out

    monkeypatch.setattr(LETObjective, "forward", forward)
    return calls


def test_cross_tokenizer_demo_with_a_teacher_of_its_own_smaller_vocabulary(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), teacher_vocab_size=280)
    calls = record_objective_calls(monkeypatch)
    metrics = demo.run_demo(config, log=lambda m: None)

    assert metrics["data"]["vocab_size"] == 320
    cross = metrics["cross_tokenizer"]
    assert cross["mode"] == "last" and cross["active"] and cross["teacher_vocab_size"] == 280
    assert 0 < cross["aligned_fraction"] <= 1 and 0 < cross["teacher_tokenize_fraction"] < 1
    assert metrics["config"]["teacher_vocab_size"] == 280
    [run] = metrics["runs"]
    assert run["let"]["aligned_fraction"] == cross["aligned_fraction"] and run["baseline"]["aligned_fraction"] is None
    assert run["baseline"]["curve"][0]["val_loss"] == run["let"]["curve"][0]["val_loss"]
    assert all(math.isfinite(p["val_loss"]) for r in ("baseline", "let") for p in run[r]["curve"])

    # the teacher was pretrained on its own 280-token BPE, with a longer context than the target's 32 tokens
    teacher_config = json.loads(Path(metrics["teacher"]["path"], "config.json").read_text())
    assert teacher_config["vocab_size"] == 280 and teacher_config["max_position_embeddings"] > config.seq_len
    # while lambda > 0 (first 8 of 16 steps) the teacher read its own ids; every alignment loss is finite
    with_teacher = [c for c in calls if c["out"].lambda_ > 0]
    assert len(with_teacher) == 8 and all(c["teacher_input_ids"] is None for c in calls if c["out"].lambda_ == 0)
    aligned = positions = 0
    for c in with_teacher:
        assert c["teacher_input_ids"].max() < 280 and math.isfinite(c["out"].align_loss.item())
        assert c["token_alignment"].mask.shape == c["input_ids"].shape and c["token_alignment"].mode == "last"
        aligned, positions = aligned + int(c["token_alignment"].mask.sum()), positions + c["input_ids"].numel()
    assert cross["aligned_fraction"] == pytest.approx(aligned / positions)
    assert "cross-tokenizer LET (last)" in demo.format_report(metrics)


def test_cross_tokenizer_cli_with_a_provided_teacher_and_mean_alignment(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    target_tokenizer = write_tokenizer(tmp_path / "target_tokenizer.json", "zebra quagga okapi " * 200)
    teacher = save_teacher(tmp_path / "teacher", 300, "lorem ipsum dolor sit amet " * 200)  # 64 positions
    argv = ["demo", "--quick", "--threads", "1", "--corpus", str(corpus), "--teacher", str(teacher), "--tokenizer",
            str(target_tokenizer), "--steps", "4", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--no-progress", "--no-plot"]
    assert main(argv) == 2  # without the flag: the clear error
    assert "--cross-tokenizer" in capsys.readouterr().err
    assert main(argv + ["--cross-tokenizer", "mean"]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    cross = metrics["cross_tokenizer"]
    teacher_vocab = json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"]
    assert cross["mode"] == "mean" and cross["active"] and cross["teacher_vocab_size"] == len(teacher_vocab)
    # 128 target tokens are more text than the teacher's first 64 tokens cover: later positions get no feature
    assert 0 < cross["aligned_fraction"] < 1
    assert "cross-tokenizer LET (mean)" in capsys.readouterr().out


def test_cross_tokenizer_inputs_are_the_teacher_tokenization_of_the_decoded_text(tmp_path):
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), cross_tokenizer="mean", teacher_vocab_size=280)
    data = demo.prepare_data(config, tmp_path / "cache", log=lambda m: None)
    teacher_config, teacher_data = demo.prepare_teacher_data(config, data, tmp_path / "cache", log=lambda m: None)
    assert teacher_data.vocab_size == 280 and teacher_config.seq_len > config.seq_len
    inputs = data.train[: 4 * config.seq_len].view(4, config.seq_len)
    cross = demo.CrossTokenizerInputs(data.tokenizer, teacher_data.tokenizer, "mean")
    teacher_ids, alignment = cross(inputs)
    for row, teacher_row in zip(inputs.tolist(), teacher_ids.tolist()):
        want = teacher_data.tokenizer.encode(data.tokenizer.decode(row, skip_special_tokens=False)).ids
        assert teacher_row[: len(want)] == want and not any(teacher_row[len(want):])
    assert alignment.mode == "mean" and cross.aligned_fraction == alignment.mask.float().mean().item() > 0.9

    # LET is cross-tokenizer only with a teacher whose tokenizer differs; the same tokenizer keeps the plain path
    for name, tokenizer, vocab, cross_expected in (("same", data.tokenizer, data.vocab_size, False),
                                                    ("own", teacher_data.tokenizer, 280, True)):
        model = demo.build_model(config.teacher_shape, vocab, teacher_config.seq_len, 0)
        save_pretrained(model, tmp_path / name, tokenizer=tokenizer)
        spec = demo.target_run(config, data, 0, name="LET", let=config.let, teacher_path=str(tmp_path / name))
        [let] = spec.objectives
        assert (let.teacher_inputs is not None) == cross_expected
        if cross_expected:
            assert let.teacher_inputs.mode == "mean"
            assert let.teacher_inputs.teacher_max_length == teacher_config.seq_len
        plain = demo.target_run(dataclasses.replace(config, cross_tokenizer=None, teacher_vocab_size=None), data, 0,
                                name="LET", let=config.let, teacher_path=str(tmp_path / "same"))
        assert plain.objectives[0].teacher_inputs is None
