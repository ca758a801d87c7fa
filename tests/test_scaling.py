"""benchmarks/scaling.py on small synthetic convergence files, in today's format and in the one before ``--methods``."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

import letkit.demo as demo
from letkit.models import count_parameters
from test_convergence import BENCHMARKS, load_benchmark

SCRIPT = BENCHMARKS / "scaling.py"
LET = {"lambda0": 3.0, "stop_fraction": 1.0, "layer_map": "L2M", "projector": "interpolate", "loss": "cosine"}
KD = {"weight": 0.5, "temperature": 1.0, "stop_fraction": 0.25}


def load_scaling():
    return load_benchmark("scaling")


def convergence_file(path: Path, layers: int, variants: dict, records: list[tuple], *, old_format: bool = False,
                     steps: int = 600) -> Path:
    """A convergence.py result: ``records`` are (seed, lr, variant, final_val_loss, step_speedup) tuples; the
    baseline's have no speedup. ``variants`` maps names to (method, let, kd)."""
    report = {
        "command": "python benchmarks/convergence.py ...",
        "config": {"target_shape": {"hidden_size": 64, "num_layers": layers, "num_heads": 2, "intermediate_size": 128},
                   "target_schedule": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 30,
                                       "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0},
                   "vocab_size": 300, "seq_len": 32},
        "teacher": {"path": "/cache/teachers/abc", "non_embedding_parameters": 10_000},
        "variants": {name: let if old_format else {"method": method, "let": let, "kd": kd}
                     for name, (method, let, kd) in variants.items()},
        "records": [],
    }
    for seed, lr, variant, loss, speedup in records:
        record = {"seed": seed, "lr": lr, "variant": variant, "final_val_loss": loss, "curve": []}
        if not old_format:
            record["method"] = variants[variant][0] if variant != "baseline" else "baseline"
        if speedup is not None:
            baseline = next(r[3] for r in records if r[:2] == (seed, lr) and r[2] == "baseline")
            record["comparison"] = {"step_speedup": speedup, "final_val_loss_delta": loss - baseline}
        report["records"].append(record)
    path.write_text(json.dumps(report))
    return path


def test_tables_and_figure_from_old_and_new_files(tmp_path, capsys):
    scaling = load_scaling()
    rng = random.Random(0)
    draw = lambda: round(rng.uniform(1.2, 2.5), 3)  # noqa: E731
    # 2 blocks, the format before --methods: an LR sweep of the baseline, LET at two LRs, an L2E variant
    old = convergence_file(tmp_path / "two_blocks.json", 2, {"let": ("let", LET, None),
                                                               "layer_map=L2E": ("let", {**LET, "layer_map": "L2E"}, None)},
                           [(0, 1e-3, "baseline", 4.6, None), (0, 1e-3, "let", 4.3, draw()),
                            (0, 1e-3, "layer_map=L2E", 4.4, draw()),
                            (0, 2e-3, "baseline", 4.5, None), (0, 2e-3, "let", 4.2, draw()),
                            (0, 4e-3, "baseline", 4.4, None)],  # the baseline's best LR, where LET did not run
                           old_format=True)
    # 4 blocks, today's format, two files pooled: three seeds of LET at 2e-3, an S_stop sweep, SALT beside them
    speedups = {seed: draw() for seed in range(3)}
    variants = {"let": ("let", LET, None), "salt": ("salt", None, KD),
                "let stop_fraction=0.25": ("let", {**LET, "stop_fraction": 0.25}, None),
                "let stop_fraction=0.5": ("let", {**LET, "stop_fraction": 0.5}, None)}
    new = [convergence_file(tmp_path / f"four_blocks_{i}.json", 4, variants, [
        rec for seed in seeds for rec in ((seed, 2e-3, "baseline", 4.5 + seed / 100, None),
                                          (seed, 2e-3, "let", 4.1 + seed / 10, speedups[seed]),
                                          (seed, 2e-3, "salt", 4.4, 1.1),
                                          (seed, 2e-3, "let stop_fraction=0.25", 4.3, 1.2 + seed / 10),
                                          (seed, 2e-3, "let stop_fraction=0.5", 4.2, 1.5))])
        for i, seeds in enumerate(([0], [1, 2]))]
    (tmp_path / "metrics.json").write_text(json.dumps({"letkit_demo": 1, "runs": []}))  # a demo's output: skipped

    png, md = tmp_path / "scaling.png", tmp_path / "scaling.md"
    assert scaling.main([str(old), str(tmp_path / "four_blocks_*.json"), str(tmp_path / "metrics.json"),
                         "--markdown", str(md), "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    assert md.read_text() == out
    assert "skipped" in err and "metrics.json" in err
    assert "the baseline did better at lr 0.004 (4.4000) than at lr 0.002 (4.5000)" in err

    runs = scaling.load_runs(scaling.expand([str(old), str(tmp_path / "four_blocks_*.json")]), log=lambda m: None)
    rows = scaling.scaling_rows(runs, "let", log=lambda m: None)
    assert [(r["depth"], r["lr"], r["seeds"]) for r in rows] == [(2, 2e-3, [0]), (4, 2e-3, [0, 1, 2])]
    for row, layers in zip(rows, (2, 4)):
        model = demo.build_model(demo.ModelShape(64, layers, 2, 128), 300, 32, 0)
        assert row["non_embedding_parameters"] == count_parameters(model, non_embedding=True)
        assert row["size_ratio"] == row["non_embedding_parameters"] / 10_000
    four = rows[1]
    assert four["step_speedup"] == demo.mean_ci95([speedups[s] for s in range(3)])
    assert four["final_loss_gap"]["mean"] == pytest.approx(sum(4.1 + s / 10 - 4.5 - s / 100 for s in range(3)) / 3)
    low, high = four["step_speedup"]["ci95"]
    assert (f"| 64, 4, 2, 128 | {four['non_embedding_parameters'] / 1e6:.2f}M | 4 | {four['size_ratio']:.1f}x | 600 | "
            f"0.002 | 3 (0, 1, 2) | {four['step_speedup']['mean']:.2f}x [{low:.2f}, {high:.2f}] |") in out
    assert rows[0]["step_speedup"]["ci95"] is None and "| 2 | " in out  # one seed: no interval

    stop = scaling.stop_fraction_rows(runs, "let")
    assert [(r["stop_fraction"], r["stop_step"], r["seeds"]) for r in stop] == [
        (0.25, 150, [0, 1, 2]), (0.5, 300, [0, 1, 2]), (1.0, 600, [0, 1, 2])]
    assert stop[0]["step_speedup"]["mean"] == pytest.approx(1.3)
    assert "| 64, 4, 2, 128 |" in out.split("S_stop sensitivity")[1] and "| 0.25 | 150 |" in out

    salt = scaling.scaling_rows(runs, "salt", log=lambda m: None)
    assert [(r["depth"], r["step_speedup"]["mean"]) for r in salt] == [(4, pytest.approx(1.1))]
    assert scaling.stop_fraction_rows(runs, "salt") == []
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path, capsys):
    scaling = load_scaling()
    with pytest.raises(SystemExit, match="matches no file"):
        scaling.main([str(tmp_path / "nothing_*.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SystemExit, match="cannot read"):
        scaling.main([str(tmp_path / "broken.json")])
    only_baseline = convergence_file(tmp_path / "baseline.json", 2, {}, [(0, 1e-3, "baseline", 4.6, None)])
    assert scaling.main([str(only_baseline)]) == 2
    assert "no let runs at their base settings" in capsys.readouterr().err
    records = [(0, 1e-3, "baseline", 4.6, None), (0, 1e-3, "let", 4.4, 1.3)]
    first = convergence_file(tmp_path / "first.json", 2, {"let": ("let", LET, None)}, records)
    rerun = convergence_file(tmp_path / "rerun.json", 2, {"let": ("let", LET, None)}, records)
    [row] = scaling.scaling_rows(scaling.load_runs([first, rerun]), "let")  # the same runs, read once
    assert row["seeds"] == [0] and row["step_speedup"]["n"] == 1
    other = convergence_file(tmp_path / "other.json", 2, {"let": ("let", LET, None)},
                             [(0, 1e-3, "baseline", 4.6, None), (0, 1e-3, "let", 4.3, 1.4)])
    with pytest.raises(SystemExit, match=r"let run of seed 0 at lr 0.001 .* is in both .*first.json .* and .*other.json"):
        scaling.main([str(first), str(other)])


def test_counts_parameters_on_the_meta_device():
    scaling = load_scaling()
    shape = {"hidden_size": 192, "num_layers": 6, "num_heads": 4, "intermediate_size": 512}
    with torch.device("cpu"):
        real = count_parameters(demo.build_model(demo.ModelShape(**shape), 2048, 128, 0), non_embedding=True)
    assert scaling.non_embedding_parameters(shape, {"vocab_size": 2048, "seq_len": 128}) == real


def test_reads_the_committed_six_block_study():
    """The files convergence.py wrote before --methods existed: the 6-block row is RESULTS.md's 2.11x [2.03, 2.18]."""
    scaling = load_scaling()
    results = SCRIPT.parent / "results" / "demo"
    runs = scaling.load_runs(scaling.expand([str(results / "deep6_*.json")]), log=lambda m: None)
    notes = []
    [row] = scaling.scaling_rows(runs, "let", log=notes.append)
    assert notes == []  # 1.5e-3, where LET ran, is also the baseline's best of the sweep
    assert (row["depth"], row["lr"], row["seeds"], row["settings"]["let"]["layer_map"]) == (6, 1.5e-3, [0, 1, 2], "L2M")
    assert [round(v, 2) for v in (row["step_speedup"]["mean"], *row["step_speedup"]["ci95"])] == [2.11, 2.03, 2.18]
    assert round(row["non_embedding_parameters"] / 1e6, 2) == 2.66 and round(row["size_ratio"], 1) == 24.9
