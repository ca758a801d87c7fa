import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from letkit import AlignmentLoss, LETObjective, LinearDecay, TeacherFeatureExtractor, alignment_loss


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
    assert out.lambda_ == pytest.approx(0.3) and out.step == 4
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
    assert objective._captured == {}  # and the target is no longer hooked


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
    with pytest.raises(RuntimeError, match="no target features captured for target layers \\[0\\]"):
        objective(ids, step=0)
    target(ids)
    with pytest.raises(ValueError, match=r"input_ids \(2, 5\) is not the batch the target just ran on"):
        objective(ids[:, :5], step=0)
    with pytest.raises(ValueError, match="unknown layer mapping strategy"):
        LETObjective(target, tiny_lm(dim=8), layer_map="E2L")
    objective(ids, step=5)
    with pytest.raises(RuntimeError, match="already released"):
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
        LETObjective(target, teacher, loss=AlignmentLoss("cosine"), check_finite=False)
    quiet = LETObjective(target, teacher, loss=AlignmentLoss("cosine", check_finite=False), check_finite=False)
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
