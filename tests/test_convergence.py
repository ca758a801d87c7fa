"""benchmarks/convergence.py: a toy-size LR sweep with LET variants over two seeds, and its summary statistics."""

import ast
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import letkit.demo as demo
from test_demo import make_corpus, tiny_config, write_tokenizer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "convergence.py"


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_convergence():
    return load_benchmark("convergence")


def test_sweep_over_seeds_lrs_and_variants_writes_consistent_json(tmp_path, monkeypatch, capsys):
    convergence = load_convergence()
    monkeypatch.setitem(demo.PRESETS, "quick", tiny_config(tmp_path, make_corpus(tmp_path / "corpus")))
    out = tmp_path / "sweep.json"
    threads = torch.get_num_threads()
    try:
        code = convergence.main(["--preset", "quick", "--seeds", "2", "--lr", "3e-3,1.5e-3", "--vary", "lambda0=0.5",
                                 "--vary", "projector=teacher_interpolate", "--cache-dir", str(tmp_path / "cache"),
                                 "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python benchmarks/convergence.py --preset quick")
    assert set(report["variants"]) == {"let", "let lambda0=0.5", "let projector=teacher_interpolate"}
    assert report["variants"]["let lambda0=0.5"] == {"method": "let", "kd": None,
                                                    "let": {**report["variants"]["let"]["let"], "lambda0": 0.5}}

    records = report["records"]
    assert len(records) == 2 * 2 * 4  # seeds x LRs x (baseline + 3 LET variants)
    assert {(r["seed"], r["lr"]) for r in records} == {(s, lr) for s in (0, 1) for lr in (3e-3, 1.5e-3)}
    for r in records:
        assert r["curve"][-1]["val_loss"] == r["final_val_loss"]
        assert ("comparison" in r) == (r["variant"] != "baseline") and r["method"] == r["variant"].split()[0]
        assert (r["teacher_forward_seconds"] > 0) == (r["variant"] != "baseline")

    rows = {(row["variant"], row["lr"]): row for row in report["summary"]}
    assert len(rows) == 4 * 2
    row = rows[("let lambda0=0.5", 1.5e-3)]
    speedups = [r["comparison"]["step_speedup"] for r in records if (r["variant"], r["lr"]) == ("let lambda0=0.5", 1.5e-3)]
    assert row["seeds"] == [0, 1] and row["step_speedup"]["mean"] == pytest.approx(sum(speedups) / 2)
    assert row["step_speedup"]["ci95"][0] <= row["step_speedup"]["mean"] <= row["step_speedup"]["ci95"][1]
    assert "step_speedup" not in rows[("baseline", 3e-3)]
    assert "0.0015" in capsys.readouterr().out  # LRs printed exactly, not rounded to one digit


def test_variants_apply_to_the_methods_that_have_the_setting():
    convergence = load_convergence()
    let, kd = demo.LETSettings(lambda0=1.0, stop_fraction=0.5), demo.KDSettings(weight=0.5, stop_fraction=0.25)
    methods = convergence.parse_methods("baseline,let,salt,rkd,let+salt")
    assert methods == ["let", "salt", "rkd", "let+salt"]
    variants = convergence.parse_variants(methods, let, kd, ["kd_weight=0.1", "kd_stop_fraction=0.5", "lambda0=3"])
    V, rkd = convergence.Variant, dataclasses.replace(kd, stop_fraction=1.0)
    assert variants == {
        "let": V("let", let, None), "salt": V("salt", None, kd), "rkd": V("rkd", None, rkd),
        "let+salt": V("let+salt", let, kd),
        "salt kd_weight=0.1": V("salt", None, dataclasses.replace(kd, weight=0.1)),
        "rkd kd_weight=0.1": V("rkd", None, dataclasses.replace(rkd, weight=0.1)),
        "let+salt kd_weight=0.1": V("let+salt", let, dataclasses.replace(kd, weight=0.1)),
        "salt kd_stop_fraction=0.5": V("salt", None, dataclasses.replace(kd, stop_fraction=0.5)),  # not RKD's
        "let+salt kd_stop_fraction=0.5": V("let+salt", let, dataclasses.replace(kd, stop_fraction=0.5)),
        "let lambda0=3": V("let", dataclasses.replace(let, lambda0=3.0), None),
        "let+salt lambda0=3": V("let+salt", dataclasses.replace(let, lambda0=3.0), kd),
    }
    only_variants = convergence.parse_variants(["salt"], let, kd, ["temperature=2"], include_base=False)
    assert only_variants == {"salt temperature=2": V("salt", None, dataclasses.replace(kd, temperature=2.0))}


def test_bad_methods_and_variants_are_refused(tmp_path, monkeypatch, capsys):
    convergence = load_convergence()
    let, kd = demo.LETSettings(lambda0=1.0, stop_fraction=0.5), demo.KDSettings()
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        convergence.parse_variants(["let"], let, kd, ["warmup=3"])
    with pytest.raises(SystemExit, match=r"none of the methods \['rkd'\] has 'kd_stop_fraction'"):
        convergence.parse_variants(["rkd"], let, kd, ["kd_stop_fraction=0.5"])
    with pytest.raises(SystemExit, match=r"none of the methods \['salt'\] has 'lambda0'"):
        convergence.parse_variants(["salt"], let, kd, ["lambda0=3"])
    for bad in ("let,kd", "let,let", ""):
        with pytest.raises(SystemExit, match="--methods"):
            convergence.parse_methods(bad)
    monkeypatch.setitem(demo.PRESETS, "quick", tiny_config(tmp_path, make_corpus(tmp_path / "corpus")))
    common = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "x.json")]
    for args, message in ((["--methods", "salt", "--vary", "temperature=0"], "salt temperature=0: logit distillation "
                                                                              "needs a finite weight >= 0"),
                          (["--methods", "let,rkd", "--cross-tokenizer"], "rkd: method 'rkd' distils the teacher's"),
                          (["--vary", "lambda0=-1"], "let lambda0=-1: LET needs lambda0 >= 0")):
        assert convergence.main([*args, *common]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x.json").exists()  # refused before any work


def test_methods_compared_in_one_lockstep_group(tmp_path, monkeypatch):
    convergence = load_convergence()
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), target_schedule=demo.TrainSchedule(8, 4, 3e-3, 1),
                         eval_every=2)
    monkeypatch.setitem(demo.PRESETS, "quick", config)
    out = tmp_path / "methods.json"
    threads = torch.get_num_threads()
    try:
        assert convergence.main(["--methods", "baseline,salt,rkd,let+salt", "--vary", "kd_weight=2", "--kd-temperature",
                                 "2", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    names = ["baseline", "salt", "rkd", "let+salt", "salt kd_weight=2", "rkd kd_weight=2", "let+salt kd_weight=2"]
    assert [r["variant"] for r in report["records"]] == names
    records = {r["variant"]: r for r in report["records"]}
    assert [records[n]["method"] for n in names] == ["baseline", "salt", "rkd", "let+salt", "salt", "rkd", "let+salt"]
    assert report["variants"]["rkd kd_weight=2"]["kd"] == {"weight": 2.0, "temperature": 2.0, "stop_fraction": 1.0}
    # each term's weight at each evaluation: SALT distils 2 of the 8 steps, RKD all 8, LET fades out by step 4
    weights = {n: [p["weights"] for p in records[n]["curve"][1:]] for n in names}
    kd_weight = demo.KDSettings().weight
    assert weights["salt"] == [{"kd": kd_weight}, {"kd": 0.0}, {"kd": 0.0}, {"kd": 0.0}]
    assert weights["rkd kd_weight=2"] == [{"kd": 2.0}] * 4
    assert [w["kd"] for w in weights["let+salt"]] == [kd_weight, 0, 0, 0] and [w["let"] > 0 for w in weights["let+salt"]] == [
        True, True, False, False]
    assert weights["baseline"] == [{}] * 4
    baseline = records["baseline"]
    for name in names[1:]:
        r = records[name]
        assert r["curve"][0]["val_loss"] == baseline["curve"][0]["val_loss"]  # the same initialisation
        assert r["final_val_loss"] != baseline["final_val_loss"] and r["teacher_forward_seconds"] > 0
        assert set(r["comparison"]) >= {"step_speedup", "final_val_loss_delta"}
    assert {row["variant"]: row["method"] for row in report["summary"]} == dict(zip(names, [records[n]["method"]
                                                                                          for n in names]))


def test_help_shows_defaults_and_the_commands_as_written(capsys):
    convergence = load_convergence()
    with pytest.raises(SystemExit) as exit_info:
        convergence.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "(default: quick)" in help_text and "(default: 1)" in help_text and "(default: torch's choice)" in help_text
    # the docstring is raw, so each command keeps its backslash line continuation
    assert "--lambda0 1 \\\n        --stop-fraction 0.5 --layer-map L2E --out quick_lr.json" in help_text


def test_target_shape_override():
    convergence = load_convergence()
    assert convergence.parse_shape("192,6,4,512") == demo.ModelShape(192, 6, 4, 512)
    for bad in ("192,6,4", "192,6,5,512", "192,0,4,512", "a,b,c,d"):
        with pytest.raises(SystemExit, match="--target-shape"):
            convergence.parse_shape(bad)


def test_benchmark_imports_only_public_names():
    imported = [(node.module, alias.name) for node in ast.walk(ast.parse(SCRIPT.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module.startswith("letkit") for alias in node.names]
    assert ("letkit.demo", "prepare") in imported
    for module, name in imported:
        assert not name.startswith("_") and not any(part.startswith("_") for part in module.split(".")), (module, name)
        if module == "letkit.demo":
            assert name in demo.__all__, name


def test_cross_tokenizer_runs_and_a_provided_teacher(tmp_path, monkeypatch):
    convergence = load_convergence()
    config = tiny_config(tmp_path, make_corpus(tmp_path / "corpus"), target_schedule=demo.TrainSchedule(6, 4, 3e-3, 1),
                         eval_every=3)
    monkeypatch.setitem(demo.PRESETS, "quick", config)
    common = ["--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert convergence.main(["--teacher-vocab-size", "280", *common, "--out", str(tmp_path / "own.json")]) == 0
        own = json.loads((tmp_path / "own.json").read_text())
        target_tokenizer = write_tokenizer(tmp_path / "target.json", "zebra quagga okapi " * 200)
        assert convergence.main(["--teacher", own["teacher"]["path"], "--tokenizer", str(target_tokenizer),
                                 "--cross-tokenizer", "mean", *common, "--out", str(tmp_path / "provided.json")]) == 0
        provided = json.loads((tmp_path / "provided.json").read_text())
    finally:
        torch.set_num_threads(threads)
    for report, provided_teacher, mode in ((own, False, None), (provided, True, "mean")):
        assert report["teacher"]["provided"] == provided_teacher and report["config"]["cross_tokenizer"] == mode
        baseline, let = report["records"]
        assert baseline["aligned_fraction"] is None and baseline["teacher_tokenize_seconds"] == 0
        assert 0 < let["aligned_fraction"] <= 1 and let["teacher_tokenize_seconds"] > 0
    assert own["config"]["teacher_vocab_size"] == 280 and provided["config"]["tokenizer"] == str(target_tokenizer)


def test_teacher_steps_pretrain_a_weaker_teacher_and_exclude_a_provided_one(tmp_path, monkeypatch, capsys):
    convergence = load_convergence()
    monkeypatch.setitem(demo.PRESETS, "quick", tiny_config(tmp_path, make_corpus(tmp_path / "corpus")))
    with pytest.raises(SystemExit):
        convergence.main(["--teacher-steps", "5", "--teacher", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert "--teacher-steps 5 pretrains the demo's teacher" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(convergence, "prepare", lambda config, **kw: seen.append(config) or sys.exit(0))
    with pytest.raises(SystemExit):
        convergence.main(["--teacher-steps", "7", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "x.json")])
    assert seen[0].teacher_schedule.steps == 7
    assert seen[0].teacher_schedule.lr == demo.PRESETS["quick"].teacher_schedule.lr
