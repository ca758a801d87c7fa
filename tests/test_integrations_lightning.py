"""LETMixin (Lightning) against the plain loop: 10 steps, gradient accumulation 2, a resume at step 5."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from integrations_testing import Trace, assert_grads_close, plain_loop  # noqa: E402
from letkit import LETObjective, LinearDecay  # noqa: E402
from letkit.integrations.lightning import SCHEDULE_KEY, LETMixin  # noqa: E402
from letkit.models import from_preset  # noqa: E402

STEPS, ACCUMULATION, BATCH, SEQ, VOCAB, S_STOP, LR = 10, 2, 2, 12, 64, 6, 0.05
RESUME_STEP = 5
LIGHTNING_DDP_SCRIPT = Path(__file__).parent / "lightning_ddp_run.py"


def lm_loss_of(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def build(teacher_vocab: int = VOCAB, stop_step: int = S_STOP):
    torch.manual_seed(0)
    target = from_preset("tiny", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB)
    torch.manual_seed(1)
    teacher = from_preset("tiny", hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                          vocab_size=teacher_vocab)
    torch.manual_seed(2)
    objective = LETObjective(target, teacher, projector="linear", schedule=LinearDecay(1.0, stop_step=stop_step))
    return target, objective


class LETModule(LETMixin, L.LightningModule):
    def __init__(self, target, objective, projector_in_optimizer: bool = True) -> None:
        super().__init__()
        self.model, self.let = target, objective
        self.projector_in_optimizer = projector_in_optimizer
        self.micro_losses: list[float] = []

    def training_step(self, ids, batch_idx):
        loss = self.let_loss(ids, lm_loss_of(self.model, ids))
        self.micro_losses.append(loss.item())
        return loss

    def validation_step(self, ids, batch_idx):
        loss = self.let_loss(ids, lm_loss_of(self.model, ids))
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        params = self.parameters() if self.projector_in_optimizer else self.model.parameters()
        return torch.optim.SGD(params, lr=LR)


class Recorder(Callback):
    def __init__(self) -> None:
        self.trace = Trace()

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.trace.record_grads(module.model, module.let)
        self.trace.released.append(module.let.finished)


def make_trainer(root: Path, max_steps: int = STEPS, **overrides):
    recorder = Recorder()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=RESUME_STEP, save_top_k=-1,
                                  filename="{step}")
    options = dict(max_steps=max_steps, accumulate_grad_batches=ACCUMULATION, accelerator="cpu", devices=1,
                   logger=CSVLogger(root, name="logs", version=0), log_every_n_steps=1,
                   callbacks=[recorder, checkpoints], enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**options, **overrides}), recorder


def loader():
    """One epoch of STEPS steps whose second half repeats the first: resumed mid-epoch, Lightning restarts a plain
    DataLoader from its first batch, so the resumed run sees the batches the uninterrupted one saw."""
    generator = torch.Generator().manual_seed(3)
    half = torch.randint(0, VOCAB, (RESUME_STEP * ACCUMULATION * BATCH, SEQ), generator=generator)
    return torch.utils.data.DataLoader(torch.cat([half, half]), batch_size=BATCH, shuffle=False)


def logged(root: Path) -> dict[int, dict[str, float]]:
    """The CSV logger's rows by step (0-based optimizer step the row was logged at)."""
    rows: dict[int, dict[str, float]] = {}
    with open(root / "logs" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    target, objective = build()
    module = LETModule(target, objective)
    trainer, recorder = make_trainer(root)
    trainer.fit(module, loader())
    return root, module, recorder


def step_losses(module) -> list[float]:
    return [sum(module.micro_losses[i:i + ACCUMULATION]) / ACCUMULATION
            for i in range(0, len(module.micro_losses), ACCUMULATION)]


def test_loss_gradients_and_logs_equal_the_plain_loop(run):
    root, module, recorder = run
    batches = list(loader())
    steps = [batches[i:i + ACCUMULATION] for i in range(0, len(batches), ACCUMULATION)]
    target, objective = build()
    want = plain_loop(target, objective, steps, lm_loss_of, LR)

    torch.testing.assert_close(torch.tensor(step_losses(module)), torch.tensor(want.losses), rtol=1e-5, atol=1e-6)
    assert_grads_close(recorder.trace.grads, want.grads, rtol=1e-4, atol=1e-6)
    assert any(name.startswith("objective.") for name in want.grads[0])
    assert recorder.trace.released == want.released == [s >= S_STOP for s in range(STEPS)]

    logs = logged(root)
    assert [logs[s]["lambda"] for s in range(STEPS)] == pytest.approx(want.lambdas)
    assert all(math.isnan(logs[s]["align_loss"]) == (s >= S_STOP) for s in range(STEPS))


def test_learned_projector_is_in_the_optimizer_and_the_checkpoint(run):
    root, module, _ = run
    optimizer = module.trainer.optimizers[0]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in module.let.parameters())
    checkpoint = torch.load(root / "checkpoints" / f"step={STEPS}.ckpt", weights_only=True)
    for name, value in module.let.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][f"let.{name}"], value)
    assert checkpoint[SCHEDULE_KEY] == module.let.schedule.state_dict()


def test_resume_mid_run_continues_with_the_same_lambda_and_loss(run, tmp_path):
    root, module, _ = run
    target, objective = build()
    resumed = LETModule(target, objective)
    trainer, _ = make_trainer(tmp_path)
    trainer.fit(resumed, loader(), ckpt_path=root / "checkpoints" / f"step={RESUME_STEP}.ckpt")
    assert step_losses(resumed) == pytest.approx(step_losses(module)[RESUME_STEP:], rel=1e-5, abs=1e-6)
    before, after = logged(root), logged(tmp_path)
    assert sorted(s for s in after if "lambda" in after[s]) == list(range(RESUME_STEP, STEPS))
    assert all(after[s]["lambda"] == before[s]["lambda"] for s in range(RESUME_STEP, STEPS))
    assert after[RESUME_STEP]["lambda"] > 0 and objective.finished


def test_resume_refuses_a_changed_schedule(run, tmp_path):
    root, _, _ = run
    target, objective = build(stop_step=S_STOP + 1)
    trainer, _ = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="stop_step: saved 6 vs 7"):
        trainer.fit(LETModule(target, objective), loader(), ckpt_path=root / "checkpoints" / f"step={RESUME_STEP}.ckpt")


def test_validation_does_not_run_the_teacher(tmp_path):
    target, objective = build()
    calls = []
    objective.teacher.model.embed.register_forward_hook(lambda *args: calls.append(1))
    trainer, _ = make_trainer(tmp_path, limit_val_batches=None)
    trainer.validate(LETModule(target, objective), loader(), verbose=False)
    assert calls == []


def test_optimizer_built_without_the_projector_is_refused(tmp_path):
    target, objective = build()
    trainer, _ = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="optimizer was built without.*projectors.0.weight"):
        trainer.fit(LETModule(target, objective, projector_in_optimizer=False), loader())


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    target, objective = build(teacher_vocab=80)
    trainer, _ = make_trainer(tmp_path)
    with pytest.raises(ValueError, match="target embeds 64 token ids and the teacher 80.*let_check_vocabulary = False"):
        trainer.fit(LETModule(target, objective), loader())


def test_schedule_past_the_last_step_warns(tmp_path):
    target, objective = build(stop_step=50)
    trainer, _ = make_trainer(tmp_path, max_steps=2)
    with pytest.warns(UserWarning, match=r"S_stop \(50\) is past the run's 2 steps"):
        trainer.fit(LETModule(target, objective), loader())


def test_two_rank_ddp_keeps_the_projectors_equal_and_survives_s_stop(tmp_path):
    """Lightning's DDP holds the projector: it reduces its gradients (no second DDP), and after S_stop the
    unused projector gets zero gradients instead of DDP's unused-parameter error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(LIGHTNING_DDP_SCRIPT), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    from safetensors.torch import load_file

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("let.projector") for k in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
