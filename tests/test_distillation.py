import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from letkit import (
    ConstantWeight,
    LETObjective,
    LinearDecay,
    LogitDistillation,
    TeacherFeatureExtractor,
    logit_distillation_loss,
)


def lm_loss_of(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def reference_loss(target_logits, teacher_logits, temperature=1.0, mask=None):
    """T^2 * mean over kept tokens of KL(teacher || target), from full logits with F.kl_div."""
    vocab = teacher_logits.shape[-1]
    log_p_target = F.log_softmax(target_logits[..., :vocab].reshape(-1, vocab) / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab) / temperature, dim=-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        log_p_target, log_p_teacher = log_p_target[keep], log_p_teacher[keep]
        if not keep.any():
            return target_logits.sum() * 0
    return temperature**2 * F.kl_div(log_p_target, log_p_teacher, reduction="batchmean", log_target=True)


def random_problem(batch=2, seq=5, vocab=11, d=7, dtype=torch.float64, bias=True, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    target = (3 * torch.randn(batch, seq, vocab + pad, generator=g, dtype=dtype)).requires_grad_()
    hidden = torch.randn(batch, seq, d, generator=g, dtype=dtype)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype)
    b = torch.randn(vocab, generator=g, dtype=dtype) if bias else None
    return target, hidden, weight, b


def teacher_logits_of(hidden, weight, bias):
    return F.linear(hidden, weight, bias)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_float64_loss_and_gradient_match_kl_div_over_full_logits(temperature, masked):
    target, hidden, weight, bias = random_problem(batch=3, seq=6, vocab=13, d=5, seed=1)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.4 if masked else None
    got = logit_distillation_loss(target, hidden, weight, bias, temperature=temperature, mask=mask, chunk_size=4)
    want = reference_loss(target, teacher_logits_of(hidden, weight, bias), temperature, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got_grad,) = torch.autograd.grad(got, target)
    (want_grad,) = torch.autograd.grad(want, target)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)


def test_backward_passes_gradcheck():
    target, hidden, weight, bias = random_problem(batch=2, seq=3, vocab=6, d=4, seed=3)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(
        lambda z: logit_distillation_loss(z, hidden, weight, bias, temperature=1.7, mask=mask, chunk_size=2), (target,)
    )


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 9),
    vocab=st.integers(2, 40),
    d=st.integers(1, 8),
    chunk_size=st.integers(1, 30),
    pad=st.integers(0, 3),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_unchunked_and_the_reference(batch, seq, vocab, d, chunk_size, pad, masked, seed):
    target, hidden, weight, bias = random_problem(batch, seq, vocab, d, dtype=torch.float32, seed=seed, pad=pad)
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) > 0.5 if masked else None
    kwargs = dict(temperature=1.3, mask=mask, vocab_size=vocab if pad else None)
    chunked = logit_distillation_loss(target, hidden, weight, bias, chunk_size=chunk_size, **kwargs)
    whole = logit_distillation_loss(target, hidden, weight, bias, chunk_size=batch * seq, **kwargs)
    (g_chunked,) = torch.autograd.grad(chunked, target)
    (g_whole,) = torch.autograd.grad(whole, target)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-7)
    want = reference_loss(target.double(), teacher_logits_of(hidden, weight, bias).double(), 1.3, mask)
    torch.testing.assert_close(chunked.double(), want, rtol=1e-4, atol=1e-5)
    assert not g_chunked[..., vocab:].any()  # padded vocabulary entries get no gradient


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(2, 3),  # one row of logits[:, :-1] would be contiguous
    seq=st.integers(1, 7),
    vocab=st.integers(2, 20),
    chunk_size=st.integers(1, 12),
    pad=st.integers(0, 3),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_non_contiguous_view_of_the_logits_is_read_in_chunks_never_copied_whole(batch, seq, vocab, chunk_size, pad,
                                                                                 masked, seed):
    logits, hidden, weight, bias = random_problem(batch, seq + 1, vocab, d=4, seed=seed, pad=pad)
    view, hidden = logits[:, :-1], hidden[:, :-1]  # the shifted logits a training loop hands over
    assert not view.is_contiguous()
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) > 0.5 if masked else None
    kwargs = dict(temperature=1.3, mask=mask, vocab_size=vocab if pad else None, chunk_size=chunk_size)
    got = logit_distillation_loss(view, hidden, weight, bias, **kwargs)
    saved = got.grad_fn.saved_tensors[0]  # what is kept until backward: the caller's logits, not a copy
    assert saved.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    want = reference_loss(view, teacher_logits_of(hidden, weight, bias), 1.3, mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got_grad,) = torch.autograd.grad(got, logits)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-14)


def test_temperature_squared_keeps_the_gradient_scale():
    target, hidden, weight, bias = random_problem(batch=2, seq=4, vocab=9, d=3, seed=4)
    teacher = teacher_logits_of(hidden, weight, bias)
    # the T^2 convention, written out: T^2 * KL of the temperature-softened distributions
    t = 3.0
    p_teacher = F.softmax(teacher / t, -1)
    manual = t**2 * (p_teacher * (p_teacher.log() - F.log_softmax(target / t, -1))).sum(-1).mean()
    torch.testing.assert_close(logit_distillation_loss(target, hidden, weight, bias, temperature=t), manual)
    # as T grows, T^2 * KL tends to a finite limit, and its gradient to (centred logit difference) / V per token:
    # without the T^2 factor both would vanish like 1/T^2
    t = 1e6  # the limit's error is O(diff / T)
    loss = logit_distillation_loss(target, hidden, weight, bias, temperature=t)
    (grad,) = torch.autograd.grad(loss, target)
    diff = (target - teacher).detach()
    centred = diff - diff.mean(-1, keepdim=True)
    tokens, vocab = 8, 9
    torch.testing.assert_close(grad, centred / vocab / tokens, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(loss, (centred**2).sum(-1).mean() / (2 * vocab), rtol=1e-4, atol=0)


def test_masks_bool_and_01_agree_and_masked_tokens_cannot_poison_the_loss():
    target, hidden, weight, bias = random_problem(seed=5)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    with torch.no_grad():
        target[~mask] = float("nan")  # e.g. padding positions of a diverged target
        hidden[~mask] = float("inf")
    by_bool = logit_distillation_loss(target, hidden, weight, bias, mask=mask)
    (grad,) = torch.autograd.grad(by_bool, target)
    for same in (mask.long(), mask.double()):
        torch.testing.assert_close(logit_distillation_loss(target, hidden, weight, bias, mask=same), by_bool)
    kept = target.detach()[mask]
    want = reference_loss(kept, teacher_logits_of(hidden[mask], weight, bias))
    torch.testing.assert_close(by_bool, want)
    assert torch.isfinite(grad).all() and not grad[~mask].any()
    nothing = logit_distillation_loss(target, hidden, weight, bias, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert nothing.item() == 0.0
    assert not torch.autograd.grad(nothing, target)[0].any()


def test_bad_inputs_name_the_argument():
    target, hidden, weight, bias = random_problem()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"temperature must be finite and > 0, got {bad}"):
            logit_distillation_loss(target, hidden, weight, bias, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a float, got bool"):
        logit_distillation_loss(target, hidden, weight, bias, temperature=True)
    with pytest.raises(ValueError, match=r"the teacher's LM head has 12 outputs but the target's logits have 11"):
        logit_distillation_loss(target, hidden, torch.randn(12, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"vocab_size=12 is larger than the teacher's \(11\) or the target's \(11\)"):
        logit_distillation_loss(target, hidden, weight, bias, vocab_size=12)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(or be a bool tensor: True keeps a token\), got 1 "
                                         r"other values, e.g. \[2\]"):
        logit_distillation_loss(target, hidden, weight, bias, mask=torch.tensor([[0, 1, 2, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"mask must have the token shape of the logits \(2, 5\), got \(2, 4\)"):
        logit_distillation_loss(target, hidden, weight, bias, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="must cover the same tokens"):
        logit_distillation_loss(target, hidden[:, :4], weight, bias)
    with pytest.raises(ValueError, match=r"head_weight must be \(V_teacher, d_teacher\) with d_teacher = 7, got \(11, 6\)"):
        logit_distillation_loss(target, hidden, weight[:, :6], bias)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        logit_distillation_loss(target, hidden, weight, bias, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
        logit_distillation_loss(target, hidden, weight, bias, vocab_size=0)
    for bad in (True, 5.0):
        with pytest.raises(TypeError, match=rf"vocab_size must be an int, got {type(bad).__name__} \({bad!r}\)"):
            logit_distillation_loss(target, hidden, weight, bias, vocab_size=bad)


def test_non_finite_teacher_logits_are_refused_unless_asked_not_to():
    target, hidden, weight, bias = random_problem()
    weight[3, 0] = float("nan")  # every token's logit 3 is NaN
    with pytest.raises(ValueError, match="the teacher's logits hold NaN/Inf at 10 of the 10 tokens being distilled"):
        logit_distillation_loss(target, hidden, weight, bias, chunk_size=3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    with pytest.raises(ValueError, match="at 1 of the 1 tokens"):
        logit_distillation_loss(target, hidden, weight, bias, mask=mask)
    assert torch.isnan(logit_distillation_loss(target, hidden, weight, bias, check_finite=False))


# ---- the objective ------------------------------------------------------------------------------------------------


def test_objective_matches_the_teachers_own_logits(tiny_lm):
    target, teacher = tiny_lm(dim=16, layers=4, seed=0), tiny_lm(dim=8, layers=2, seed=1)
    objective = LogitDistillation(target, teacher, schedule=LinearDecay(0.5, stop_step=10), temperature=2.0, chunk_size=5)
    ids = torch.randint(0, 50, (2, 6))
    logits = target(ids)
    lm = lm_loss_of(logits, ids)
    out = objective(ids, lm_loss=lm, step=4)
    with torch.no_grad():
        want = reference_loss(logits, teacher(ids), temperature=2.0)
    assert out.lambda_ == pytest.approx(0.3) and objective.schedule.current_step == 4
    torch.testing.assert_close(out.distill_loss, want)
    torch.testing.assert_close(out.loss, lm + 0.3 * want)
    out.loss.backward()
    assert target.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert list(objective.parameters()) == [] and objective.state_dict() == {}  # holds neither model's weights


def test_objective_on_letkit_llama_models():
    from letkit.models import from_preset

    torch.manual_seed(0)
    target, teacher = from_preset("tiny"), from_preset("tiny", hidden_size=32, num_hidden_layers=1)
    objective = LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, stop_step=2), chunk_size=7)
    ids = torch.randint(0, 256, (2, 9))
    logits = target(ids)
    with torch.no_grad():
        want = reference_loss(logits, teacher(ids))
    torch.testing.assert_close(objective(ids, step=0).distill_loss, want)


def test_objective_without_lm_loss_and_with_a_mask(tiny_lm):
    target, teacher = tiny_lm(seed=0), tiny_lm(dim=8, seed=1)
    objective = LogitDistillation(target, TeacherFeatureExtractor(teacher), schedule=ConstantWeight(2.0, stop_step=3))
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    logits = target(ids)
    out = objective(ids, step=0, mask=mask)
    assert out.lm_loss is None and out.lambda_ == 2.0
    torch.testing.assert_close(out.loss, 2.0 * reference_loss(logits.detach(), teacher(ids).detach(), mask=mask))


def test_schedule_end_releases_the_teacher_and_unhooks_the_target(tiny_lm):
    target, teacher = tiny_lm(seed=0), tiny_lm(dim=8, seed=1)
    calls = []
    teacher.embed.register_forward_hook(lambda *a: calls.append(1))
    objective = LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, stop_step=3))
    calls.clear()  # construction probed the teacher
    teacher_ref = weakref.ref(teacher)
    del teacher
    ids = torch.randint(0, 50, (2, 6))
    for step in range(6):
        out = objective(ids, lm_loss=lm_loss_of(target(ids), ids), step=step)
        assert (out.distill_loss is not None) == (step < 3) and out.lambda_ == (1.0 if step < 3 else 0.0)
    assert len(calls) == 3 and objective.finished
    gc.collect()
    assert teacher_ref() is None  # nothing holds the teacher's memory any more
    logits = weakref.ref(target(ids))
    gc.collect()
    assert logits() is None  # and the target's logits are no longer captured
    with pytest.raises(RuntimeError, match=r"lambda\(1\) = 1.0 > 0, but the objective's teacher was released at the end of the schedule"):
        objective(ids, step=1)


def test_vocabulary_mismatch_and_padding(tiny_lm):
    teacher = tiny_lm(vocab=50, dim=8, seed=1)
    padded_target = tiny_lm(vocab=64, seed=0)  # embedding padded beyond a 50-token tokenizer
    ids = torch.randint(0, 50, (2, 6))
    objective = LogitDistillation(padded_target, teacher, schedule=ConstantWeight(1.0, stop_step=3))
    padded_target(ids)
    with pytest.raises(ValueError, match="the teacher's LM head has 50 outputs but the target's logits have 64.*vocab_size="):
        objective(ids, step=0)
    objective = LogitDistillation(padded_target, teacher, schedule=ConstantWeight(1.0, stop_step=3), vocab_size=50)
    logits = padded_target(ids)
    out = objective(ids, step=0)
    torch.testing.assert_close(out.distill_loss, reference_loss(logits.detach(), teacher(ids).detach()))
    out.loss.backward()
    assert not padded_target.lm_head.weight.grad[50:].any()  # the padding rows learn nothing from the teacher
    with pytest.raises(ValueError, match=r"vocab_size=51 is larger than the teacher's LM head \(50 outputs\)"):
        LogitDistillation(padded_target, teacher, schedule=ConstantWeight(1.0, stop_step=3), vocab_size=51)


def test_objective_errors(tiny_lm):
    target, teacher = tiny_lm(seed=0), tiny_lm(dim=8, seed=1)
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got nan"):
        LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, 3), temperature=float("nan"))
    objective = LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, 3))
    ids = torch.randint(0, 50, (2, 6))
    with pytest.raises(RuntimeError, match="no target logits captured"):
        objective(ids, step=0)
    target(ids)
    with pytest.raises(ValueError, match=r"input_ids \(2, 5\) is not the batch the target just ran on"):
        objective(ids[:, :5], step=0)
    with torch.no_grad():
        teacher.final_norm.bias[0] = float("nan")
    target(ids)
    with pytest.raises(ValueError, match="the teacher's logits hold NaN/Inf at 12 of the 12 tokens"):
        objective(ids, step=0)


def test_a_teacher_whose_logits_are_not_its_head_of_the_final_hidden_state_is_refused(tiny_lm):
    class SoftCapped(nn.Module):  # changes its logits after the head, like logit soft-capping
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return 3 * torch.tanh(self.inner(ids) / 3)

    with pytest.raises(ValueError, match="does not reproduce its logits"):
        LogitDistillation(tiny_lm(), SoftCapped(tiny_lm(dim=8, seed=1)), schedule=ConstantWeight(1.0, 3), lm_head="inner.lm_head")
    class Headless(nn.Module):  # a base model: its forward returns hidden states
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])

        def forward(self, ids):
            return self.blocks[0](self.embed(ids))

    with pytest.raises(ValueError, match="could not find the LM head of the teacher Headless"):
        LogitDistillation(tiny_lm(), Headless(), schedule=ConstantWeight(1.0, 3))


def test_a_deep_copy_of_the_target_does_not_steal_the_captured_logits(tiny_lm):
    target = tiny_lm()
    objective = LogitDistillation(target, tiny_lm(dim=8, seed=1), schedule=ConstantWeight(1.0, 3))
    ema = copy.deepcopy(target)  # carries the capture hook along
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    ema(torch.randint(0, 50, (2, 6)))
    objective(ids, step=0).loss.backward()
    assert target.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ema.parameters())


def test_let_and_logit_distillation_combine_with_one_shared_teacher(tiny_lm):
    """LET + SALT on one forward pass: the summed loss has the summed gradients, and SALT ending does not disturb LET."""

    def grads(use_let, use_kd, steps=(0, 2, 3)):
        target, teacher = tiny_lm(dim=16, layers=4, seed=0), tiny_lm(dim=8, layers=2, seed=1)
        let = LETObjective(target, teacher, schedule=LinearDecay(0.5, stop_step=6)) if use_let else None
        kd = LogitDistillation(target, teacher, schedule=ConstantWeight(0.8, stop_step=2), temperature=2.0) if use_kd else None
        ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(7))
        result = []
        for step in steps:
            target.zero_grad()
            logits = target(ids)
            lm = lm_loss_of(logits, ids)
            loss = lm
            if let is not None:
                loss = let(ids, lm_loss=lm, step=step).loss
            if kd is not None:
                loss = loss + kd(ids, step=step).loss
            loss.backward()
            result.append({n: p.grad.clone() for n, p in target.named_parameters()})
        return result, kd

    plain, _ = grads(False, False)
    let_only, _ = grads(True, False)
    kd_only, _ = grads(False, True)
    both, kd = grads(True, True)
    for step in range(3):
        for name in plain[step]:
            want = let_only[step][name] + kd_only[step][name] - plain[step][name]
            torch.testing.assert_close(both[step][name], want, rtol=1e-5, atol=1e-7)
    # distillation ended at step 2 and released its teacher reference; LET ran on the same model at step 3
    assert kd.finished


# ---- the conventions LogitDistillation shares with LETObjective -------------------------------------------------


OBJECTIVES = {"LETObjective": LETObjective, "LogitDistillation": LogitDistillation}


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_one_step_counter(tiny_lm, objective_class):
    target = tiny_lm()
    schedule = LinearDecay(1.0, stop_step=4)
    objective = objective_class(target, tiny_lm(dim=8, seed=1), schedule=schedule)
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    assert objective(ids, step=2).lambda_ == pytest.approx(0.5)
    assert schedule.current_step == 2 and schedule.state_dict()["current_step"] == 2  # what a checkpoint saves
    target(ids)
    assert objective(ids).lambda_ == pytest.approx(0.5)  # without step=, the same counter
    schedule.step()
    for _ in range(3):  # gradient accumulation: one call per micro-batch, all at the optimizer's step
        target(ids)
        assert objective(ids).lambda_ == pytest.approx(0.25) and schedule.current_step == 3
    with pytest.raises(TypeError, match=r"step must be an int, got float \(nan\)"):
        objective(ids, step=float("nan"))
    assert schedule.current_step == 3


def test_an_evaluation_forward_in_between_does_not_replace_the_training_logits(tiny_lm):
    target, teacher = tiny_lm(seed=0), tiny_lm(dim=8, seed=1)
    objective = LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, stop_step=4))
    train_ids, eval_ids = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))

    def expected(ids):
        with torch.no_grad():
            return reference_loss(target(ids), teacher(ids))

    target(train_ids)
    with torch.no_grad():
        target(eval_ids)
    out = objective(train_ids, step=0)
    assert out.distill_loss.requires_grad  # distillation still trains the target
    torch.testing.assert_close(out.distill_loss, expected(train_ids))
    with torch.no_grad():  # measuring the distillation loss of an evaluation batch stays possible
        target(eval_ids)
        torch.testing.assert_close(objective(eval_ids, step=0).distill_loss, expected(eval_ids))


def test_an_evaluation_batchs_logits_are_not_held_once_training_resumes(tiny_lm):
    target = tiny_lm()
    LogitDistillation(target, tiny_lm(dim=8, seed=1), schedule=ConstantWeight(1.0, stop_step=4))
    with torch.no_grad():
        eval_logits = weakref.ref(target(torch.randint(0, 50, (2, 6))))
    gc.collect()
    assert eval_logits() is not None  # kept for an objective call under no_grad
    target(torch.randint(0, 50, (2, 6)))
    gc.collect()
    assert eval_logits() is None


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_outputs_of_another_batch_are_refused(tiny_lm, objective_class):
    target = tiny_lm()
    objective = objective_class(target, tiny_lm(dim=8, seed=1), schedule=ConstantWeight(1.0, stop_step=4))
    batch = torch.randint(0, 50, (2, 7))
    target(batch[:, :-1])
    target(torch.randint(0, 50, (2, 6)))
    with pytest.raises(ValueError, match="the target's latest forward in this grad mode ran on other token ids than the input_ids"):
        objective(batch[:, :-1], step=0)
    target(batch[:, :-1].clone())
    objective(batch[:, :-1], step=0)  # another tensor holding the same ids


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_outputs_without_grad_under_grad_mode_are_refused(tiny_lm, objective_class):
    target = tiny_lm()
    objective = objective_class(target, tiny_lm(dim=8, seed=1), schedule=ConstantWeight(1.0, stop_step=4))
    target.requires_grad_(False)
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(RuntimeError, match="the target's (layer-0 features|logits) carry no gradient although grad mode is on"):
        objective(ids, step=0)
    with torch.no_grad():  # measuring the loss without training stays possible
        target(ids)
        assert objective(ids, step=0).loss.isfinite()


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_a_teacher_sharing_parameters_with_the_target_is_refused_before_freezing(tiny_lm, objective_class):
    target = tiny_lm()
    with pytest.raises(ValueError, match=r"the teacher shares 16 parameters with the target \(e.g. \['embed.weight', "):
        objective_class(target, target, schedule=ConstantWeight(1.0, stop_step=4))
    assert all(p.requires_grad for p in target.parameters()) and target.training


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_an_extractor_built_with_check_causal_false_is_not_probed_again(tiny_lm, objective_class):
    teacher = tiny_lm(dim=8, seed=1)
    teacher.blocks[0].register_forward_hook(lambda module, args, out: out + out.mean(1, keepdim=True))  # sees ahead
    with pytest.raises(ValueError, match="is not causal"):
        objective_class(tiny_lm(), teacher, schedule=ConstantWeight(1.0, stop_step=4))
    extractor = TeacherFeatureExtractor(teacher, check_causal=False)  # the user's informed opt-out
    objective = objective_class(tiny_lm(), extractor, schedule=ConstantWeight(1.0, stop_step=4))
    assert objective.teacher.model is teacher


def test_no_teacher_after_the_end_of_the_schedule(tiny_lm):
    """A run resumed at or after stop_step needs no teacher: the objective is finished from the start."""
    target = tiny_lm()
    schedule = ConstantWeight(1.0, stop_step=4)
    schedule.current_step = 4
    objective = LogitDistillation(target, None, schedule=schedule)
    assert objective.finished
    ids = torch.randint(0, 50, (2, 6))
    lm = lm_loss_of(target(ids), ids)
    out = objective(ids, lm_loss=lm)
    assert out.loss is lm and out.distill_loss is None and out.lambda_ == 0.0
    with pytest.raises(RuntimeError, match=r"lambda\(1\) = 1.0 > 0, but the objective's teacher was built without one"):
        objective(ids, step=1)
    with pytest.raises(ValueError, match=r"teacher=None is only for a run at or after the schedule's stop_step \(S_stop\), "
                                         "but the schedule is at step 0 < stop_step 4: pass the teacher"):
        LogitDistillation(target, None, schedule=ConstantWeight(1.0, stop_step=4))


@pytest.mark.parametrize("objective_class, example", [(LETObjective, r"LinearDecay\(0.1"), (LogitDistillation, r"ConstantWeight\(0.5")],
                         ids=OBJECTIVES)
def test_the_schedule_is_required(tiny_lm, objective_class, example):
    target, teacher = tiny_lm(), tiny_lm(dim=8, seed=1)
    with pytest.raises(TypeError, match=rf"{objective_class.__name__} needs schedule=, e.g. schedule=letkit.{example}, stop_step=...\)"):
        objective_class(target, teacher)
    with pytest.raises(TypeError, match="schedule must be a letkit LambdaSchedule .*got function"):
        objective_class(target, teacher, schedule=lambda step: 0.1)


def test_bad_masks_are_named_as_for_the_alignment_loss(tiny_lm):
    target = tiny_lm()
    objective = LogitDistillation(target, tiny_lm(dim=8, seed=1), schedule=ConstantWeight(1.0, stop_step=4))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor of bools \(or of 0s and 1s\), got list"):
        objective(ids, step=0, mask=[[1] * 6] * 2)
    target(ids)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .*e.g. \[-1.0\]"):
        objective(ids, step=0, mask=torch.tensor([[1.0] * 6, [1.0] * 5 + [-1.0]]))
    target(ids)
    with pytest.raises(ValueError, match="mask must be on the target logits' device, got target on cpu and mask on meta"):
        objective(ids, step=0, mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))


@pytest.mark.parametrize("objective_class", OBJECTIVES.values(), ids=OBJECTIVES)
def test_a_bad_mask_costs_no_teacher_forward_and_leaves_the_captured_outputs(tiny_lm, objective_class):
    target, teacher = tiny_lm(), tiny_lm(dim=8, seed=1)
    objective = objective_class(target, teacher, schedule=ConstantWeight(1.0, stop_step=4))
    teacher_forwards = []
    teacher.register_forward_pre_hook(lambda *args: teacher_forwards.append(1))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        objective(ids, step=0, mask=torch.full((2, 6), 2))
    assert teacher_forwards == []
    out = objective(ids, step=0, mask=torch.ones(2, 6))  # the same forward's outputs, left for the corrected call
    assert teacher_forwards == [1] and out.loss.requires_grad
    with pytest.raises(RuntimeError, match="no target .* captured"):  # used once
        objective(ids, step=0)


def test_a_vocabulary_mismatch_costs_no_teacher_forward(tiny_lm):
    teacher, target = tiny_lm(vocab=50, dim=8, seed=1), tiny_lm(vocab=64, seed=0)
    objective = LogitDistillation(target, teacher, schedule=ConstantWeight(1.0, stop_step=3))
    teacher_forwards = []
    teacher.register_forward_pre_hook(lambda *args: teacher_forwards.append(1))
    ids = torch.randint(0, 50, (2, 6))
    target(ids)
    with pytest.raises(ValueError, match="the teacher's LM head has 50 outputs but the target's logits have 64"):
        objective(ids, step=0)
    assert teacher_forwards == []
