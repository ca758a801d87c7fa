"""LETTrainer (transformers.Trainer) against the plain loop: 10 steps, gradient accumulation 2, a resume at step 5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from hf_ddp_run import MAX_NORM  # noqa: E402
from integrations_testing import Trace, assert_grads_close, plain_loop  # noqa: E402
from letkit import LETObjective, LinearDecay  # noqa: E402
from letkit.integrations import hf  # noqa: E402
from letkit.integrations.hf import OBJECTIVE_FILE, SCHEDULE_FILE, LETTrainer  # noqa: E402

STEPS, ACCUMULATION, BATCH, SEQ, VOCAB, S_STOP, LR = 10, 2, 2, 12, 64, 6, 0.05


def tiny_llama(hidden: int, seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def build(teacher_vocab: int = VOCAB, stop_step: int = S_STOP):
    target, teacher = tiny_llama(32, seed=0), tiny_llama(16, seed=1, vocab=teacher_vocab)
    torch.manual_seed(2)
    objective = LETObjective(target, teacher, projector="linear", schedule=LinearDecay(1.0, stop_step=stop_step))
    return target, objective


def hf_lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows: int) -> None:
        self.ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Each step's gradients (before the update) and whether the teacher was released."""

    def __init__(self, target, objective) -> None:
        self.target, self.objective, self.trace = target, objective, Trace()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trace.record_grads(self.target, self.objective)
        self.trace.released.append(self.objective.finished)


class RecordingTrainer(LETTrainer):
    """Keeps every training micro-batch, so the plain loop can run on the same ones."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.micro_batches.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, *args, **kwargs)


def make_trainer(output_dir, target, objective, max_steps=STEPS, **overrides) -> RecordingTrainer:
    args = TrainingArguments(**{
        **dict(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=BATCH,
               gradient_accumulation_steps=ACCUMULATION, learning_rate=LR, optim="sgd", lr_scheduler_type="constant",
               weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="steps", save_steps=5, report_to=[],
               use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True),
        **overrides})
    recorder = Recorder(target, objective)
    trainer = RecordingTrainer(model=target, args=args, train_dataset=TokenDataset(STEPS * ACCUMULATION * BATCH),
                               eval_dataset=TokenDataset(4), let_objective=objective, callbacks=[recorder])
    trainer.micro_batches, trainer.recorder = [], recorder
    return trainer


def train_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("hf")
    target, objective = build()
    trainer = make_trainer(output_dir, target, objective)
    trainer.train()
    return output_dir, trainer, objective


def test_loss_gradients_and_logs_equal_the_plain_loop(run):
    _, trainer, objective = run
    steps = [trainer.micro_batches[i:i + ACCUMULATION] for i in range(0, STEPS * ACCUMULATION, ACCUMULATION)]
    assert len(steps) == STEPS and all(len(s) == ACCUMULATION for s in steps)
    target, reference_objective = build()
    want = plain_loop(target, reference_objective, steps, hf_lm_loss, LR)

    logs = train_logs(trainer)
    assert sorted(logs) == list(range(1, STEPS + 1))  # the log at step k is about training step k - 1
    got_losses = [logs[k]["loss"] for k in range(1, STEPS + 1)]
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want.losses), rtol=1e-5, atol=1e-6)
    assert [logs[k]["lambda"] for k in range(1, STEPS + 1)] == pytest.approx(want.lambdas)
    assert want.lambdas[S_STOP - 1] > 0 and want.lambdas[S_STOP] == 0
    assert all(("align_loss" in logs[k]) == (k <= S_STOP) for k in logs)
    assert_grads_close(trainer.recorder.trace.grads, want.grads, rtol=1e-4, atol=1e-6)
    assert any(name.startswith("objective.") for name in want.grads[0])
    assert trainer.recorder.trace.released == want.released == [s >= S_STOP for s in range(STEPS)]


def test_learned_projector_is_in_the_optimizer_and_the_checkpoints(run):
    output_dir, trainer, objective = run
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in objective.parameters())
    saved = load_file(output_dir / f"checkpoint-{STEPS}" / OBJECTIVE_FILE)
    assert saved.keys() == objective.state_dict().keys() and saved
    for name, value in objective.state_dict().items():
        torch.testing.assert_close(saved[name], value)
    assert (output_dir / "checkpoint-5" / SCHEDULE_FILE).is_file()


def test_resume_mid_run_continues_with_the_same_lambda_and_loss(run, tmp_path):
    output_dir, trainer, _ = run
    target, objective = build()
    resumed = make_trainer(tmp_path, target, objective)
    resumed.train(resume_from_checkpoint=str(output_dir / "checkpoint-5"))
    before = train_logs(trainer)
    after = {k: entry for k, entry in train_logs(resumed).items() if k > 5}  # 1-5 come from the checkpoint's state
    assert sorted(after) == list(range(6, STEPS + 1))
    for k in after:
        assert after[k]["lambda"] == before[k]["lambda"]
        assert after[k]["loss"] == pytest.approx(before[k]["loss"], rel=1e-5, abs=1e-6)
    assert after[6]["lambda"] > 0 and objective.finished  # step 5 still used the teacher, released at step 6


def test_evaluation_does_not_run_the_teacher(tmp_path):
    target, objective = build()
    calls = []
    objective.teacher.model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    trainer = make_trainer(tmp_path, target, objective)
    metrics = trainer.evaluate()
    assert calls == []
    ids = TokenDataset(4).ids
    with torch.no_grad():
        want = hf_lm_loss(target, ids).item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_optimizer_built_without_the_projector_is_refused(tmp_path):
    target, objective = build()
    optimizer = torch.optim.SGD(target.parameters(), lr=LR)
    trainer = make_trainer(tmp_path, target, objective)
    trainer.optimizer = optimizer
    with pytest.raises(ValueError, match="optimizer was built without.*projectors.0.weight"):
        trainer.train()


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    target, objective = build(teacher_vocab=80)
    with pytest.raises(ValueError, match="target embeds 64 token ids and the teacher 80"):
        make_trainer(tmp_path, target, objective).train()
    target, objective = build(teacher_vocab=80, stop_step=1)
    trainer = make_trainer(tmp_path, target, objective, max_steps=1)
    trainer.check_vocabulary = False
    trainer.train()  # switched off: it trains


def test_schedule_past_the_last_step_warns(tmp_path):
    target, objective = build(stop_step=50)
    with pytest.warns(UserWarning, match=r"S_stop \(50\) is past the run's 2 steps"):
        make_trainer(tmp_path, target, objective, max_steps=2).train()


def test_objective_must_be_a_let_objective(tmp_path):
    target, _ = build()
    with pytest.raises(TypeError, match="let_objective must be a letkit.LETObjective"):
        LETTrainer(model=target, args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                   let_objective=object())



def total_norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


@pytest.mark.skipif(not hf._TRAINER_CLIPPING_HOOKS, reason="transformers < 5.3 refuses this (tested below)")
def test_max_grad_norm_clips_a_learned_projector_with_the_model_under_one_norm(tmp_path):
    unclipped = make_trainer(tmp_path / "unclipped", *build(stop_step=1), max_steps=1)
    unclipped.train()
    grads = unclipped.recorder.trace.grads[0]
    assert any(name.startswith("objective.") for name in grads) and any(name.startswith("model.") for name in grads)
    norm = total_norm(grads)
    assert train_logs(unclipped)[1]["grad_norm"] == pytest.approx(norm, rel=1e-5)  # counts the projector's too

    max_norm = norm / 4
    clipped = make_trainer(tmp_path / "clipped", *build(stop_step=1), max_steps=1, max_grad_norm=max_norm)
    clipped.train()
    assert train_logs(clipped)[1]["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    factor = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ coefficient
    assert_grads_close([clipped.recorder.trace.grads[0]], [{k: g * factor for k, g in grads.items()}], rtol=1e-4,
                       atol=1e-7)
    assert total_norm(clipped.recorder.trace.grads[0]) == pytest.approx(max_norm, rel=1e-4)


def test_a_learned_projector_is_refused_where_it_cannot_be_clipped_with_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "_TRAINER_CLIPPING_HOOKS", False)
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 would clip the model's gradients but not the learned "
                                         r"projector's: clipping both under one norm needs transformers 5.3 or later"):
        make_trainer(tmp_path, *build(), max_grad_norm=1.0)
    make_trainer(tmp_path, *build(), max_grad_norm=0.0)  # no clipping: nothing to refuse
    target, teacher = tiny_llama(32, seed=0), tiny_llama(16, seed=1)
    interpolating = LETObjective(target, teacher, projector="interpolate", schedule=LinearDecay(1.0, stop_step=S_STOP))
    make_trainer(tmp_path, target, interpolating, max_grad_norm=1.0)  # no projector parameters to clip


@pytest.mark.skipif(not hf._TRAINER_CLIPPING_HOOKS, reason="transformers < 5.3 refuses this (tested above)")
def test_two_rank_ddp_clips_the_projector_with_the_model_under_one_norm(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--rdzv-conf",
               "join_timeout=900,read_timeout=600", str(Path(__file__).with_name("hf_ddp_run.py")), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    grads = {name: [load_file(tmp_path / f"{name}_rank{r}.safetensors") for r in range(2)] for name in ("unclipped", "clipped")}
    logs = {name: [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(2)] for name in grads}
    assert {log["distributed_type"] for runs in logs.values() for log in runs} == {"MULTI_CPU"}
    unclipped = grads["unclipped"][0]
    assert any(name.startswith("objective.") for name in unclipped)
    assert_grads_close(grads["unclipped"][1:], [unclipped], rtol=0, atol=0)  # all-reduced: equal on both ranks
    norm = total_norm(unclipped)
    assert [log["grad_norm"] for runs in logs.values() for log in runs] == pytest.approx([norm] * 4, rel=1e-5)
    factor = MAX_NORM / (norm + 1e-6)
    want = {name: g * factor for name, g in unclipped.items()}
    assert_grads_close(grads["clipped"], [want, want], rtol=1e-4, atol=1e-10)
