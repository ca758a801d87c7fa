"""LET in torchtitan at the component level, on CPU: torchtitan's own debug Llama and chunked loss.

torchtitan's Trainer itself cannot run here: with no accelerator it picks the device type "cuda", and its
FlexAttention has no backward on CPU. So these tests build the debug model as its config registry does (with the
inner attention swapped to SDPA, as torchtitan's own graph_trainer tests do), wrap the debug config's loss with
LETLoss, and run one train step the way ``Trainer._forward_backward_body`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchtitan")

from torchtitan.config import ConfigManager  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402
from torchtitan.models.llama3.config_registry import llama3_debugmodel  # noqa: E402

from integrations_testing import Trace, assert_grads_close, plain_loop  # noqa: E402
from letkit import alignment_loss  # noqa: E402
from letkit.integrations.torchtitan import (  # noqa: E402
    LETConfig,
    LETLoss,
    LETTrainer,
    build_objective,
    llama3_debugmodel_let,
)
from letkit.models import from_preset, save_pretrained  # noqa: E402

VOCAB, SEQ, BATCH, ACCUMULATION = 2048, 32, 2, 2
LET = LETConfig(teacher_path="random:tiny", teacher_dtype="float32", lambda0=1.0, stop_step=3)


def debug_model(attention: str = "sdpa"):
    config = model_registry("debugmodel").model
    if attention == "sdpa":
        for layer in config.layers:
            layer.attention.inner_attention = ScaledDotProductAttention.Config()  # FlexAttention: no CPU backward
    torch.manual_seed(0)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.train()


def objective_for(model, let: LETConfig = LET):
    torch.manual_seed(1)  # the random teacher
    return build_objective(let, model, torch.device("cpu"))


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(10 + step)
    tokens = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator) for _ in range(ACCUMULATION)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def torchtitan_step(model, let_loss, step_counter, step):
    """One optimizer step's forward and backward as torchtitan's Trainer runs them (no optimizer update)."""
    step_counter[0] = step + 1  # torchtitan's Trainer.step counts from 1
    batches = micro_batches(step)
    global_valid_tokens = sum((labels != -100).sum() for _, labels in batches)
    total = 0.0
    for inputs, labels in batches:
        loss, _ = let_loss(model(inputs), labels, global_valid_tokens)
        loss.backward()
        total += loss.item()
    return total


@pytest.fixture
def setup():
    model = debug_model()
    objective = objective_for(model)
    loss_config = llama3_debugmodel().loss  # the debug config's ChunkedLossWrapper around cross-entropy
    base = loss_config.build(compile_config=None)
    base.set_lm_head(model.lm_head)
    model._skip_lm_head = True  # as Trainer.__init__ does for a ChunkedLossWrapper
    step_counter = [0]
    return model, objective, LETLoss(base, objective, model, lambda: step_counter[0] - 1), step_counter


def test_the_objective_aligns_the_first_of_torchtitans_layers_with_the_teacher(setup):
    model, objective, _, _ = setup  # torchtitan's layers is a ModuleDict: "0", "1", ...
    first_block = []
    model.layers["0"].register_forward_hook(lambda module, args, output: first_block.append(output))
    ids = micro_batches(0)[0][0]
    model(ids)
    out = objective(ids, step=0)
    want = alignment_loss(first_block[0], objective.teacher(ids)[0], projection="interpolate")
    torch.testing.assert_close(out.align_loss, want)
    assert objective.teacher.model.embed.num_embeddings == VOCAB  # random:tiny takes the model's vocabulary


def test_objective_builds_on_the_flex_attention_model():
    """The debug config as torchtitan trains it: its FlexAttention cannot run the probe forward a projector kind
    would need (no attention masks), so the projector is built from the widths."""
    model = debug_model(attention="flex")
    objective = objective_for(model)
    assert objective.projector.target_dims == [256] and objective.projector.teacher_dims == [64]


@pytest.mark.parametrize("step", [1, 3])  # lambda = 2/3, and 0 at S_stop
def test_train_step_loss_and_gradients_equal_the_plain_loop(setup, step):
    model, objective, let_loss, step_counter = setup
    got_loss = torchtitan_step(model, let_loss, step_counter, step)
    got = Trace()
    got.record_grads(model, objective)

    reference = debug_model()
    reference_objective = objective_for(reference)
    batches = micro_batches(step)

    def lm_loss(target, inputs):
        labels = next(lb for ids, lb in batches if ids is inputs)
        return F.cross_entropy(target(inputs).flatten(0, 1).float(), labels.flatten())

    want = plain_loop(reference, reference_objective, [[ids for ids, _ in batches]], lm_loss, lr=0.0, first_step=step)
    assert got_loss == pytest.approx(want.losses[-1], rel=1e-5)
    assert_grads_close(got.grads, want.grads[-1:], rtol=1e-4, atol=2e-6)
    assert objective.finished == (step >= LET.stop_step) == reference_objective.finished
    metrics = let_loss.pop_metrics()
    assert metrics["let/lambda"] == pytest.approx(want.lambdas[-1])
    assert ("let/align_loss" in metrics) == (step < LET.stop_step)


def test_registry_config_parses_with_a_let_section():
    config = ConfigManager().parse_args(["--module", "letkit.integrations.torchtitan", "--config",
                                         "llama3_debugmodel_let", "--let.teacher_path", "random:tiny",
                                         "--let.stop_step", "4", "--let.layer_map", "L2M"])
    assert isinstance(config, LETTrainer.Config)
    assert (config.let.teacher_path, config.let.stop_step, config.let.layer_map) == ("random:tiny", 4, "L2M")
    assert config.training.disable_cuda_graphs and config.model_spec.flavor == "debugmodel"


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.parallelism, "tensor_parallel_degree", 2), "data parallelism only.*tensor_parallel_degree"),
    (lambda c: setattr(c.training, "disable_cuda_graphs", False), "CUDA graph.*disable_cuda_graphs"),
])
def test_trainer_refuses_what_let_cannot_do(change, message):
    config = llama3_debugmodel_let()
    change(config)
    with pytest.raises(ValueError, match=message):
        LETTrainer(config)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    save_pretrained(from_preset("tiny", vocab_size=100), tmp_path)
    let = LETConfig(teacher_path=str(tmp_path), teacher_dtype="float32")
    with pytest.raises(ValueError, match="target embeds 2048 token ids and the teacher 100.*--let.check_vocabulary"):
        objective_for(debug_model(), let)


@pytest.mark.parametrize("let, message", [
    (LETConfig(teacher_path="random:tiny", teacher_dtype="bf16"), "let.teacher_dtype must name a torch dtype, got 'bf16'"),
    (LETConfig(teacher_path="random:tiny", teacher_dtype="Tensor"), "let.teacher_dtype must name a torch dtype"),
    (LETConfig(teacher_path=""), "let.teacher_path is empty"),
])
def test_bad_let_settings_are_named(let, message):
    with pytest.raises(ValueError, match=message):
        build_objective(let, debug_model(), torch.device("cpu"))
