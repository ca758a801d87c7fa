import copy
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from letkit import AlignmentLoss, LayerMappingProjector, LETObjective, LinearDecay, TeacherFeatureExtractor, alignment_loss
from nested_block_lists import Experts, Stack


def lm_loss_of(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_loss_is_lm_plus_lambda_times_alignment(tiny_lm):
    target, teacher = tiny_lm(dim=16, layers=4, seed=0), tiny_lm(dim=8, layers=2, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(0.5, stop_step=10))
    ids = torch.randint(0, 50, (2, 6))
    logits = target(ids)
    lm = lm_loss_of(logits, ids)
    out = objective(ids, lm_loss=lm, step=4)
    with torch.no_grad():
        h_target = target.blocks[0](target.embed(ids))  # L2E: the target's first block
        x = teacher.embed(ids)
        for block in teacher.blocks:
            x = block(x)
        h_teacher = teacher.final_norm(x)
    want_align = alignment_loss(h_target, h_teacher, projection="interpolate")
    assert out.lambda_ == pytest.approx(0.3) and objective.schedule.current_step == 4
    torch.testing.assert_close(out.align_loss, want_align)
    torch.testing.assert_close(out.loss, lm + 0.3 * want_align)


def test_alignment_term_only_when_no_lm_loss(tiny_lm):
    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    out = objective(ids, step=0)
    assert out.lm_loss is None and torch.equal(out.loss, out.align_loss)


def test_gradients_reach_early_target_layers_not_the_teacher(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, layer_map="L2E", projector="linear", schedule=LinearDecay(1.0, stop_step=4))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    objective(ids, step=0).loss.backward()  # alignment term only
    assert target.blocks[0].mix.weight.grad.abs().sum() > 0
    assert target.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.blocks[1].parameters())  # after layer k: no alignment gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in objective.parameters())  # the learned projector trains


def test_teacher_not_called_after_schedule_and_released(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    calls = []
    teacher.embed.register_forward_hook(lambda *a: calls.append(1))
    objective = LETObjective(target, TeacherFeatureExtractor(teacher), schedule=LinearDecay(1.0, stop_step=3))
    calls.clear()  # constructing ran the teacher once to discover its feature size
    teacher_ref = weakref.ref(teacher)
    del teacher
    ids = torch.randint(0, 50, (2, 6))
    for step in range(6):
        out = objective(ids, lm_loss=lm_loss_of(target(ids), ids), step=step)
        assert (out.align_loss is not None) == (step < 3)
    assert len(calls) == 3
    assert objective.finished
    gc.collect()
    assert teacher_ref() is None  # nothing holds the teacher's memory any more
    hooks = [m._forward_hooks or m._forward_pre_hooks for m in target.modules()]
    assert not any(hooks)  # and the target is no longer hooked


def test_bit_identical_across_runs(tiny_lm):
    def run():
        torch.manual_seed(0)
        target, teacher = tiny_lm(layers=4, seed=0), tiny_lm(dim=8, seed=1)
        objective = LETObjective(target, teacher, projector="mlp", loss="smooth_l1", schedule=LinearDecay(0.5, stop_step=4))
        opt = torch.optim.AdamW(list(target.parameters()) + list(objective.parameters()), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(6):
            ids = torch.randint(0, 50, (2, 8), generator=g)
            out = objective(ids, lm_loss=lm_loss_of(target(ids), ids), step=step)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        return losses

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == len(first)


def test_schedule_counter_is_the_default_step(tiny_lm):
    target = tiny_lm(layers=4)
    schedule = LinearDecay(1.0, stop_step=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=schedule)
    ids = torch.randint(0, 50, (1, 5))
    for _ in range(2):
        schedule.step()
    target(ids)
    assert objective(ids).lambda_ == pytest.approx(0.5)


def test_errors(tiny_lm):
    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(RuntimeError, match="no target features captured with grad enabled for target layers \\[0\\]"):
        objective(ids, step=0)
    target(ids)
    with pytest.raises(ValueError, match=r"input_ids \(2, 5\) is not the batch the target just ran on"):
        objective(ids[:, :5], step=0)
    with pytest.raises(ValueError, match="unknown layer mapping strategy"):
        LETObjective(target, tiny_lm(dim=8), layer_map="E2L", schedule=LinearDecay(1.0, stop_step=4))
    objective(ids, step=5)
    with pytest.raises(RuntimeError, match="lambda\\(1\\) = 0.75 > 0, but the objective's teacher was released at the end of the schedule"):
        objective(ids, step=1)


@pytest.mark.parametrize("check_finite", [True, False])
def test_check_finite_reaches_the_alignment_loss(tiny_lm, check_finite):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4), check_finite=check_finite)
    assert objective.loss_fn.check_finite is check_finite
    with torch.no_grad():
        teacher.final_norm.bias[0] = float("nan")  # one non-finite teacher feature per token
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    if check_finite:
        with pytest.raises(ValueError, match="teacher features contain 12 non-finite values"):
            objective(ids, step=0)
    else:
        assert torch.isnan(objective(ids, step=0).align_loss)  # not caught here: the caller watches the loss


def test_check_finite_false_with_a_checking_loss_instance_is_refused(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    with pytest.raises(ValueError, match=r"check_finite=False has no effect on the AlignmentLoss passed as loss"):
        LETObjective(target, teacher, loss=AlignmentLoss("cosine"), check_finite=False, schedule=LinearDecay(1.0, 4))
    quiet = LETObjective(target, teacher, loss=AlignmentLoss("cosine", check_finite=False), check_finite=False,
                         schedule=LinearDecay(1.0, 4))
    assert not quiet.loss_fn.check_finite


def test_cross_tokenizer_alignment(tiny_lm):
    from letkit.token_alignment import align_tokens

    target, teacher = tiny_lm(layers=4, seed=0), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4))
    # 6 one-character target tokens; the teacher reads the same text in 3 two-character tokens
    target_offsets = torch.tensor([[[i, i + 1] for i in range(6)]] * 2)
    teacher_offsets = torch.tensor([[[0, 2], [2, 4], [4, 6]]] * 2)
    alignment = align_tokens(target_offsets, teacher_offsets, mode="last")
    assert alignment.mask.tolist() == [[False, True, False, True, False, True]] * 2  # odd positions have read a whole teacher token
    ids, teacher_ids = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 3))
    target(ids)
    out = objective(ids, step=0, teacher_input_ids=teacher_ids, token_alignment=alignment)
    with torch.no_grad():
        h_target = target.blocks[0](target.embed(ids))
        (h_teacher,) = TeacherFeatureExtractor(teacher)(teacher_ids)
    want = alignment_loss(h_target, alignment.gather(h_teacher), projection="interpolate", mask=alignment.mask)
    torch.testing.assert_close(out.align_loss, want)

    target(ids)
    with pytest.raises(ValueError, match=r"token_alignment covers target \(2, 6\) and teacher \(2, 3\) tokens.*teacher_input_ids is \(2, 4\)"):
        objective(ids, step=0, teacher_input_ids=torch.randint(0, 50, (2, 4)), token_alignment=alignment)
    target(ids)
    with pytest.raises(ValueError, match="needs both teacher_input_ids and token_alignment"):
        objective(ids, step=0, teacher_input_ids=teacher_ids)


def test_bad_cross_tokenizer_arguments_are_refused_before_anything_runs(tiny_lm):
    from letkit.token_alignment import align_tokens

    target, teacher = tiny_lm(layers=4, seed=0), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4))
    teacher_forwards = []
    teacher.register_forward_pre_hook(lambda *args: teacher_forwards.append(1))
    alignment = align_tokens(torch.tensor([[[i, i + 1] for i in range(6)]] * 2), torch.tensor([[[0, 2], [2, 4], [4, 6]]] * 2))
    ids, teacher_ids = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 3))
    target(ids)
    with pytest.raises(ValueError, match="needs both teacher_input_ids and token_alignment"):
        objective(ids, step=2, teacher_input_ids=teacher_ids)
    with pytest.raises(ValueError, match=r"token_alignment covers target \(2, 6\) and teacher \(2, 3\) tokens"):
        objective(ids, step=2, teacher_input_ids=teacher_ids[:, :2], token_alignment=alignment)
    assert teacher_forwards == [] and objective.schedule.current_step == 0  # not even the step was taken
    out = objective(ids, step=2, teacher_input_ids=teacher_ids, token_alignment=alignment)  # the features were left
    assert teacher_forwards == [1] and out.align_loss.requires_grad and objective.schedule.current_step == 2


def test_a_deep_copy_of_the_target_does_not_steal_the_captured_features(tiny_lm):
    import copy

    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    ema = copy.deepcopy(target)  # carries the capture hook along
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    ema(torch.randint(0, 50, (2, 6)))
    objective(ids, step=0).loss.backward()
    assert target.blocks[0].mix.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ema.parameters())


def refuse_to_run(*args, **kwargs):
    raise AssertionError("a model ran while the objective was built")


def test_built_from_sizes_without_running_either_model(tiny_lm):
    target, teacher_model = tiny_lm(dim=16, layers=4), tiny_lm(dim=8, seed=1)
    teacher = TeacherFeatureExtractor(teacher_model)  # (its causality probe runs here, before the models refuse)
    target.forward = teacher_model.forward = refuse_to_run
    by_argument = LETObjective(target, teacher, projector="linear", target_dims=16, teacher_dims=[8],
                               schedule=LinearDecay(1.0, stop_step=4))
    assert (by_argument.projector.target_dims, by_argument.projector.teacher_dims) == ([16], [8])
    target.config, teacher_model.config = SimpleNamespace(hidden_size=16), SimpleNamespace(hidden_size=8)
    by_config = LETObjective(target, teacher, projector="mlp", schedule=LinearDecay(1.0, stop_step=4))
    assert (by_config.projector.target_dims, by_config.projector.teacher_dims) == ([16], [8])

    probed = LETObjective(tiny_lm(dim=16, layers=4), tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    assert (probed.projector.target_dims, probed.projector.teacher_dims) == ([16], [8])  # the fallback measures the same

    del target.forward, teacher_model.forward
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    assert by_argument(ids, step=0).align_loss.requires_grad


def test_bad_sizes_are_named(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    with pytest.raises(ValueError, match=r"target_dims must be a positive int or 2 of them \(one per layer pair\), got \[16\]"):
        LETObjective(target, teacher, layer_map=["L2E", "L2M"], target_dims=[16], schedule=LinearDecay(1.0, 4))
    with pytest.raises(ValueError, match="teacher_dims must be >= 1, got 0"):
        LETObjective(target, teacher, teacher_dims=0, schedule=LinearDecay(1.0, 4))
    with pytest.raises(TypeError, match=r"target_dims\[1\] must be an int, got float \(16.0\)"):
        LETObjective(target, teacher, layer_map=["L2E", "L2M"], target_dims=[16, 16.0], schedule=LinearDecay(1.0, 4))
    with pytest.raises(ValueError, match="the LayerMappingProjector passed as projector has its own sizes"):
        LETObjective(target, teacher, projector=LayerMappingProjector([16], [8]), target_dims=16, schedule=LinearDecay(1.0, 4))
    with pytest.raises(ValueError, match=r"the projector has 2 layer pairs, but the layer map .* has 1"):
        LETObjective(target, teacher, projector=LayerMappingProjector([16, 16], [8, 8]), schedule=LinearDecay(1.0, 4))


def test_a_run_resumed_after_s_stop_needs_no_teacher(tiny_lm):
    trained = LETObjective(tiny_lm(layers=4), tiny_lm(dim=8, seed=1), projector="linear", schedule=LinearDecay(1.0, 4))
    checkpoint = {"objective": trained.state_dict(), "schedule": trained.schedule.state_dict()}
    checkpoint["schedule"]["current_step"] = 7  # saved after S_stop

    target = tiny_lm(layers=4)
    schedule = LinearDecay(1.0, 4)
    schedule.load_state_dict(checkpoint["schedule"])
    objective = LETObjective(target, None, projector="linear", target_dims=16, teacher_dims=8, schedule=schedule)
    objective.load_state_dict(checkpoint["objective"])  # the learned projector is rebuilt, so its state loads
    assert objective.finished and objective.teacher is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in target.modules())
    ids = torch.randint(0, 50, (2, 6))
    lm = lm_loss_of(target(ids), ids)
    out = objective(ids, lm_loss=lm)
    assert out.loss is lm and out.align_loss is None and out.lambda_ == 0.0
    with pytest.raises(RuntimeError, match=r"lambda\(1\) = 0.75 > 0, but the objective's teacher was built without one"):
        objective(ids, step=1)

    with pytest.raises(ValueError, match=r"teacher=None is only for a run at or after the schedule's stop_step \(S_stop\), "
                                         "but the schedule is at step 0 < stop_step 4"):
        LETObjective(target, None, target_dims=16, teacher_dims=8, schedule=LinearDecay(1.0, 4))
    with pytest.raises(ValueError, match="without a teacher, pass teacher_dims= .* so the mlp projector is rebuilt"):
        LETObjective(target, None, projector="mlp", schedule=schedule)
    with pytest.raises(ValueError, match=r"without a teacher, pass target_dims= \(TinyLM has no config.hidden_size\)"):
        LETObjective(target, None, projector="linear", teacher_dims=8, schedule=schedule)


def test_a_run_resumed_after_s_stop_with_the_interpolating_projector_needs_no_sizes(tiny_lm):
    trained = LETObjective(tiny_lm(layers=4), tiny_lm(dim=8, seed=1), projector="interpolate", schedule=LinearDecay(1.0, 4))
    schedule = LinearDecay(1.0, 4)
    schedule.current_step = 4
    target = tiny_lm(layers=4)  # no config.hidden_size either
    objective = LETObjective(target, None, projector="interpolate", schedule=schedule)
    objective.load_state_dict(trained.state_dict())  # nothing to restore, and nothing missing
    assert objective.finished and objective.projector is None
    ids = torch.randint(0, 50, (2, 6))
    lm = lm_loss_of(target(ids), ids)
    assert objective(ids, lm_loss=lm).loss is lm
    with pytest.raises(ValueError, match="teacher_dims must be >= 1, got 0"):  # sizes given are still checked
        LETObjective(target, None, projector="interpolate", teacher_dims=0, schedule=schedule)


def test_an_evaluation_forward_in_between_does_not_replace_the_training_features(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4))
    train_ids, eval_ids = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))

    def expected(ids):
        with torch.no_grad():
            h_target = target.blocks[0](target.embed(ids))
            (h_teacher,) = TeacherFeatureExtractor(copy.deepcopy(teacher))(ids)
        return alignment_loss(h_target, h_teacher, projection="interpolate")

    target(train_ids)
    with torch.no_grad():
        target(eval_ids)
    out = objective(train_ids, step=0)
    assert out.align_loss.requires_grad  # LET still trains the target
    torch.testing.assert_close(out.align_loss, expected(train_ids))
    with torch.no_grad():  # measuring the alignment of an evaluation batch stays possible
        target(eval_ids)
        torch.testing.assert_close(objective(eval_ids, step=0).align_loss, expected(eval_ids))


def test_features_of_another_batch_are_refused(tiny_lm):
    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    batch = torch.randint(0, 50, (2, 7))
    target(batch[:, :-1])
    target(torch.randint(0, 50, (2, 6)))
    with pytest.raises(ValueError, match="the target's latest forward in this grad mode ran on other token ids than the input_ids"):
        objective(batch[:, :-1], step=0)
    target(batch[:, :-1])
    objective(batch[:, :-1], step=0)  # the same memory: no value comparison needed
    target(batch[:, :-1].clone())
    objective(batch[:, :-1], step=0)  # another tensor holding the same ids


def test_features_without_grad_under_grad_mode_are_refused(tiny_lm):
    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    target.embed.requires_grad_(False)
    target.blocks[0].requires_grad_(False)
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(RuntimeError, match="the target's layer-0 features carry no gradient although grad mode is on"):
        objective(ids, step=0)


def test_compiled_target(tiny_lm):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4))
    compiled = torch.compile(target, backend="eager")
    ids = torch.randint(0, 50, (2, 6))
    compiled(ids)
    got = objective(ids, step=0).align_loss
    target(ids)
    torch.testing.assert_close(got, objective(ids, step=0).align_loss)
    compiled(torch.randint(0, 50, (2, 6)))
    with pytest.raises(ValueError, match="ran on other token ids"):
        objective(ids, step=0)


def test_a_teacher_sharing_parameters_with_the_target_is_refused_before_freezing(tiny_lm):
    target = tiny_lm(layers=4)
    with pytest.raises(ValueError, match=r"the teacher shares 20 parameters with the target \(e.g. \['embed.weight', "):
        LETObjective(target, target, schedule=LinearDecay(1.0, stop_step=4))
    teacher = tiny_lm(seed=1)
    teacher.embed = target.embed
    with pytest.raises(ValueError, match=r"the teacher shares 1 parameters with the target \(e.g. \['embed.weight'\]\)"):
        LETObjective(target, teacher, schedule=LinearDecay(1.0, stop_step=4))
    assert all(p.requires_grad for p in target.parameters()) and target.training
    with pytest.raises(ValueError, match="The TeacherFeatureExtractor already froze them"):
        LETObjective(target, TeacherFeatureExtractor(teacher), schedule=LinearDecay(1.0, stop_step=4))


def test_bad_masks_are_named(tiny_lm):
    target = tiny_lm(layers=4)
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), schedule=LinearDecay(1.0, stop_step=4))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor of bools .*got list"):
        objective(ids, step=0, mask=[[1] * 6] * 2)
    target(ids)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*e.g. \[-1.0\]"):
        objective(ids, step=0, mask=torch.tensor([[1.0] * 6, [1.0] * 5 + [-1.0]]))


def test_block_discovery_on_a_mixture_of_experts_target(tiny_lm):
    target = Stack({"layers": 3})  # each block holds 6 experts
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), layer_map="L2L", schedule=LinearDecay(1.0, stop_step=4))
    assert objective.block_list_path == "layers" and objective.pairs == [(2, 2)]


def test_block_list_argument_and_its_deprecated_alias(tiny_lm):
    target, teacher = Stack({"layers": 3}), tiny_lm(dim=8, seed=1)
    objective = LETObjective(target, teacher, block_list="layers.1.experts", schedule=LinearDecay(1.0, stop_step=4))
    assert objective.block_list_path == "layers.1.experts"
    with pytest.warns(DeprecationWarning, match=r"target_block_list=...\) is deprecated: pass block_list="):
        old = LETObjective(target, teacher, target_block_list="layers.0.experts", schedule=LinearDecay(1.0, stop_step=4))
    assert old.block_list_path == "layers.0.experts"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="block_list='layers' and its deprecated alias"):
        LETObjective(target, teacher, block_list="layers", target_block_list="blocks", schedule=LinearDecay(1.0, stop_step=4))


def test_a_target_block_returning_no_tensor_is_named(tiny_lm):
    class DictBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.blocks = torch.nn.ModuleList(Experts(8, 2) for _ in range(2))

        def forward(self, ids):
            return self.blocks[0](self.embed(ids))

    target = DictBlocks()
    target.blocks[0].register_forward_hook(lambda module, args, output: {"hidden": output})
    objective = LETObjective(target, tiny_lm(dim=8, seed=1), target_dims=8, schedule=LinearDecay(1.0, stop_step=4))
    with pytest.raises(TypeError, match=r"target block 0 \(blocks.0, Experts\) returned a dict with keys \['hidden'\], not a tensor"):
        target(torch.randint(0, 50, (2, 6)))
    assert objective.pairs == [(2, 0)]


@pytest.mark.parametrize("bad", [
    dict(layer_map=["L2E", "L2M"], target_dims=[16]),
    dict(teacher_dims=0),
    dict(projector=LayerMappingProjector([16, 16], [8, 8])),
    dict(projector="conv"),
    dict(projector=torch.nn.Linear(16, 8)),
], ids=["target_dims", "teacher_dims", "projector pairs", "projector kind", "projector type"])
def test_a_failed_construction_leaves_no_hooks_on_the_target(tiny_lm, bad):
    target, teacher = tiny_lm(layers=4), tiny_lm(dim=8, seed=1)
    with pytest.raises((TypeError, ValueError), match="dims|projector"):
        LETObjective(target, teacher, schedule=LinearDecay(1.0, 4), **bad)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in target.modules())
