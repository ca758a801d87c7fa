"""From a run to scores: `letkit export` (DCP checkpoint -> HF layout) and `letkit eval` (lm-evaluation-harness)."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

from letkit.cli import main
from letkit.data import tokenize_corpus
from letkit.evaluation import local_choice_task
from letkit.export import export_checkpoint
from letkit.models import from_preset, load_pretrained, save_pretrained
from letkit.models.hub import CheckpointError

EXAMPLE = Path(__file__).parents[1] / "examples" / "pretrain_fsdp.py"
NUMBERS = 24


def counting_tokenizer() -> Tokenizer:
    words = ["<|endoftext|>", "count:", *map(str, range(NUMBERS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def counting_text(rng: random.Random, length: int = 10) -> str:
    start = rng.randrange(NUMBERS - length)
    return "count: " + " ".join(str(start + i) for i in range(length))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-rank FSDP run of examples/pretrain_fsdp.py (tiny config, 4 steps, checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp("export")
    counting_tokenizer().save(str(root / "tokenizer.json"))
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(counting_text(rng) for _ in range(300)))
    tokenize_corpus([root / "corpus.txt"], root / "shards", root / "tokenizer.json", shard_tokens=2000, num_workers=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
               "--config", "tiny", "--data.path", str(root / "shards"), "--train.run_dir", str(root / "run"),
               "--train.steps", "4", "--checkpoint.every", "2", "--teacher.path", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "run"


def test_exported_checkpoint_loads_in_transformers_with_the_trained_logits(fsdp_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_checkpoint(fsdp_run / "checkpoints" / "step_0000004", tmp_path / "hf", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    # The run's own export of the same (last) step, through FSDP's full state dict, in bf16.
    trained = load_pretrained(fsdp_run / "final_model", dtype=torch.float32).model
    exported = load_pretrained(out, dtype=torch.float32).model
    for name, tensor in trained.state_dict().items():
        assert torch.equal(tensor, exported.state_dict()[name].to(torch.bfloat16).float()), name
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("count: 3 4 5 6 7")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, exported(ids), rtol=1e-5, atol=1e-5)
    assert not torch.equal(exported.state_dict()["embed.weight"],
                           load_pretrained(export_checkpoint(fsdp_run / "checkpoints" / "step_0000002",
                                                             tmp_path / "step2")).model.state_dict()["embed.weight"]
                           .float())  # a mid-run step exports too, with its own weights


def test_export_refuses_bad_checkpoints_and_existing_outputs(fsdp_run, tmp_path):
    good = fsdp_run / "checkpoints" / "step_0000004"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        export_checkpoint(good, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(good), str(out)]) == 2

    broken = tmp_path / "step_0000004"
    broken.mkdir()
    (broken / "trainer_state.json").write_bytes((good / "trainer_state.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"incomplete or damaged: it has no \.metadata"):
        export_checkpoint(broken, tmp_path / "a")
    with pytest.raises(CheckpointError, match="is not a directory"):
        export_checkpoint(tmp_path / "missing", tmp_path / "a")

    other_shape = tmp_path / "other" / "step_0000004"
    other_shape.parent.mkdir()
    shutil.copytree(good, other_shape)
    state = json.loads((other_shape / "trainer_state.json").read_text())
    state["config"]["model"]["preset"] = "125m"
    (other_shape / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="does not hold the model its config describes"):
        export_checkpoint(other_shape, tmp_path / "a")

    truncated = tmp_path / "truncated" / "step_0000004"
    shutil.copytree(good, truncated)
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"incomplete or damaged: {shard.name} has \d+ bytes, \d+ were written"):
        export_checkpoint(truncated, tmp_path / "a")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".tmp-*"))

    assert main(["export", str(good), str(out), "--overwrite"]) == 0  # replaced, atomically
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_export_clears_only_its_own_parents_leftovers(fsdp_run, tmp_path):
    # another tree below the parent (e.g. a run directory on a filesystem shared with other nodes, whose pids are
    # not this machine's) keeps its temporaries: only the parent's own .tmp-* entries are export's to clear
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    nested = tmp_path / "run" / "checkpoints" / "step_0000008.tmp" / f".tmp-trainer_state.json-{dead_pid}-abc123"
    nested.parent.mkdir(parents=True)
    nested.write_text("{}")
    own = tmp_path / f".tmp-hf-{dead_pid}-new"
    own.mkdir()
    export_checkpoint(fsdp_run / "checkpoints" / "step_0000004", tmp_path / "hf")
    assert nested.is_file() and not own.exists()


def test_export_refuses_a_checkpoint_whose_checksums_fail_naming_the_file(fsdp_run, tmp_path):
    """Bytes changed in place (same size) in a shard or in DCP's .metadata: refused before DCP reads anything,
    naming the file (before letkit.checkpointing, export checked sizes only and wrote the altered weights). A
    checkpoint of a version that recorded no checksums is exported with a warning that only sizes were checked."""
    good = fsdp_run / "checkpoints" / "step_0000004"
    for name in ("__1_0.distcp", ".metadata"):
        altered = tmp_path / name / "step_0000004"
        shutil.copytree(good, altered)
        content = bytearray((altered / name).read_bytes())
        content[len(content) // 2] ^= 0x01
        (altered / name).write_bytes(bytes(content))
        with pytest.raises(CheckpointError, match=rf"incomplete or damaged: {re.escape(name)} has other bytes than were "
                                                  r"written \(its SHA-256 differs"):
            export_checkpoint(altered, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    unchecked = tmp_path / "unchecked" / "step_0000004"
    shutil.copytree(good, unchecked)
    state = json.loads((unchecked / "trainer_state.json").read_text())
    del state["sha256"]
    (unchecked / "trainer_state.json").write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="records no checksums .* only its file sizes were checked"):
        export_checkpoint(unchecked, tmp_path / "out", dtype=torch.float32)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _train_counting_model(steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    tokenizer = counting_tokenizer()
    model = from_preset("tiny", vocab_size=tokenizer.get_vocab_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for _ in range(steps):
        batch = torch.tensor([tokenizer.encode(counting_text(rng)).ids for _ in range(16)])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_lm_eval_scores_a_local_task_and_training_on_its_text_beats_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no hub here: the local JSON task must not need one
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'letkit[eval]')")
    from letkit.evaluation import evaluate_checkpoint

    rng = random.Random(2)
    with open(tmp_path / "counting.jsonl", "w") as f:
        for _ in range(30):
            start = rng.randrange(NUMBERS - 4)
            gold = str(start + 3)
            choices = [gold, *rng.sample([str(n) for n in range(NUMBERS) if str(n) != gold], 3)]
            rng.shuffle(choices)
            context = "count: " + " ".join(str(start + i) for i in range(3))
            f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(gold)}) + "\n")
    task = local_choice_task(tmp_path / "counting.jsonl", tmp_path / "tasks")
    scores = {}
    for name, steps in (("random", 0), ("trained", 150)):
        save_pretrained(_train_counting_model(steps), tmp_path / name, tokenizer=counting_tokenizer())
        result = evaluate_checkpoint(tmp_path / name, [task], num_fewshot=1, device="cpu", dtype="float32",
                                     include_paths=[tmp_path / "tasks"])
        scores[name] = result["results"][task]["acc"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores["trained"] >= scores["random"] + 0.3, scores  # measured: 0.73 vs 0.30 (chance 0.25)


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "line 2: not JSON"),
    (json.dumps({"choices": ["a", "b"], "label": 0}), 'line 2: expected an object with a string "context"'),
    (json.dumps({"context": "x", "choices": ["a"], "label": 0}), '"choices" must be a list of at least two strings'),
    (json.dumps({"context": "x", "choices": ["a", "b"], "label": 2}), '"label" must be an int index into the 2'),
    (json.dumps({"context": "x", "choices": ["a", "b"], "label": True}), '"label" must be an int index'),
])
def test_local_task_files_with_malformed_items_are_refused_naming_the_line(tmp_path, line, message):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "label": 1}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        local_choice_task(items, tmp_path / "tasks")
    assert str(items) in str(error.value) and not (tmp_path / "tasks").exists()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no items"):
        local_choice_task(tmp_path / "empty.jsonl", tmp_path / "tasks")


def test_eval_refuses_a_directory_without_tokenizer(tmp_path, capsys):
    save_pretrained(from_preset("tiny"), tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--tasks", "arc_easy"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
