"""Fused identity/interpolate alignment kernels vs the float64 torch reference (letkit.losses).

Without CUDA the kernels run under Triton's CPU interpreter (switched on by tests/conftest.py).
"""

import math
import os
from unittest import mock

import pytest
import torch
from kernel_testing import (
    DEVICE,
    LOSS_ATOL,
    TOLERANCE,
    assert_gradient_close,
    ill_conditioned,
    poisoned_allocations,
    relative_error,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from letkit.kernels import fused_alignment_loss
from letkit.kernels import fused_interpolate_alignment as fia
from letkit.losses import FUSED_GRAD_DTYPES, FUSED_TEACHER_DTYPES, LOSS_KINDS, alignment_loss, interpolation_taps


def check_against_reference(target, teacher, kind, projection, mask=None, grad_scale=1.0):
    """Fused vs float64 torch loss and target gradient, within the dtype's tolerance (or, for an ill-conditioned
    gradient, as close as letkit's float32 torch path)."""
    target = target.detach().requires_grad_()
    with poisoned_allocations():
        loss = fused_alignment_loss(target, teacher, kind, projection=projection, mask=mask)
        (loss * grad_scale).backward()
    reference_target = target.detach().double().requires_grad_()
    reference = alignment_loss(reference_target, teacher.double(), kind, projection=projection, mask=mask, backend="torch")
    (reference * grad_scale).backward()
    torch_target = target.detach().clone().requires_grad_()
    (alignment_loss(torch_target, teacher, kind, projection=projection, mask=mask, backend="torch") * grad_scale).backward()

    tolerance = TOLERANCE[target.dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Plus an absolute LOSS_ATOL: 1 - cos of nearly parallel features is computed next to 1, where float32 resolves ~1e-7.
    assert abs(loss.item() - reference.item()) <= tolerance * abs(reference.item()) + LOSS_ATOL
    assert target.grad.dtype == target.dtype and target.grad.shape == target.shape
    assert_gradient_close(target.grad, reference_target.grad, tolerance, torch_target.grad)


def random_mask(draw, tokens):
    pattern = draw(st.sampled_from(["none", "random", "all_masked", "float_0_1"]))
    if pattern == "none":
        return None
    if pattern == "all_masked":
        return torch.zeros(tokens, dtype=torch.bool, device=DEVICE)
    if pattern == "float_0_1":
        return (torch.rand(tokens, device=DEVICE) < 0.6).float()
    return torch.rand(tokens, device=DEVICE) < 0.6


@st.composite
def problems(draw):
    projection = draw(st.sampled_from(["identity", "interpolate"]))
    d_target = draw(st.integers(1, 48))
    d_teacher = d_target if projection == "identity" else draw(st.integers(1, 48))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    return dict(
        projection=projection,
        kind=draw(st.sampled_from(LOSS_KINDS)),
        dtype=draw(st.sampled_from(FUSED_GRAD_DTYPES)),
        teacher_dtype=draw(st.sampled_from(FUSED_TEACHER_DTYPES)),
        shape=(batch, seq),
        d_target=d_target,
        d_teacher=d_teacher,
        mask=random_mask(draw, batch * seq),
        max_row_block=draw(st.sampled_from([16, fia.MAX_ROW_BLOCK])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=20, deadline=None)
@given(problems())
def test_matches_float64_reference(problem):
    assume(not ill_conditioned(problem["kind"], problem["projection"], problem["d_target"], problem["d_teacher"]))
    generator = torch.Generator(device=DEVICE).manual_seed(problem["seed"])
    dtype, shape = problem["dtype"], problem["shape"]
    target = torch.randn(*shape, problem["d_target"], generator=generator, device=DEVICE).to(dtype)
    teacher = torch.randn(*shape, problem["d_teacher"], generator=generator, device=DEVICE).to(problem["teacher_dtype"])
    mask = problem["mask"]
    if mask is not None:
        mask = mask.reshape(shape)
    with mock.patch.object(fia, "MAX_ROW_BLOCK", problem["max_row_block"]):
        check_against_reference(target, teacher, problem["kind"], problem["projection"], mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled (not interpreted) kernels need CUDA")
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_cuda_kernels_on_ragged_shapes(kind):
    generator = torch.Generator(device=DEVICE).manual_seed(19)
    target = torch.randn(3, 173, 2000, generator=generator, device=DEVICE).bfloat16()
    teacher = torch.randn(3, 173, 576, generator=generator, device=DEVICE).bfloat16()
    mask = torch.rand(3, 173, generator=generator, device=DEVICE) < 0.8
    check_against_reference(target, teacher, kind, "interpolate", mask, grad_scale=0.5)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("d_target,d_teacher", [(40, 24), (24, 40), (3, 9), (9, 3), (37, 37)])
def test_interpolation_both_directions_with_scaled_grad(kind, d_target, d_teacher):
    generator = torch.Generator(device=DEVICE).manual_seed(d_target * 100 + d_teacher)
    target = torch.randn(5, d_target, generator=generator, device=DEVICE)
    teacher = torch.randn(5, d_teacher, generator=generator, device=DEVICE)
    check_against_reference(target, teacher, kind, "interpolate", grad_scale=-2.5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300))
def test_adjoint_ranges_cover_exactly_the_taps(d_in, d_out):
    lo, hi, frac, first, count, max_count = fia.interpolation_adjoint(d_in, d_out, torch.device("cpu"))
    reference_lo, reference_hi, reference_frac = interpolation_taps(d_in, d_out)
    assert torch.equal(lo.long(), reference_lo) and torch.equal(hi.long(), reference_hi)
    assert torch.equal(frac, reference_frac)
    outputs = torch.arange(d_out)
    for i in range(d_in):
        touching = outputs[(reference_lo == i) | (reference_hi == i)]
        expected = torch.arange(int(first[i]), int(first[i] + count[i]))
        assert torch.equal(touching, expected), (i, touching, expected)
    assert max_count == int(count.max())


@pytest.mark.parametrize(
    "kind,projection,d_target,d_teacher",
    [("cosine", "identity", 1, 1), ("cosine", "interpolate", 1, 7), ("smooth_l1", "identity", 1, 1), ("smooth_l1", "interpolate", 1, 7)],
)
def test_flat_losses_have_near_zero_gradients(kind, projection, d_target, d_teacher):
    """The ``ill_conditioned`` cases whose exact gradient is 0: float32 noise only (genuine gradients here are ~1e-2)."""
    generator = torch.Generator(device=DEVICE).manual_seed(d_teacher)
    target = torch.randn(6, d_target, generator=generator, device=DEVICE, requires_grad=True)
    teacher = torch.randn(6, d_teacher, generator=generator, device=DEVICE)
    loss = fused_alignment_loss(target, teacher, kind, projection=projection)
    loss.backward()
    expected = alignment_loss(target.detach().double(), teacher.double(), kind, projection=projection, backend="torch")
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(abs(expected.item()), 1e-6)
    assert target.grad.abs().max().item() <= 1e-5


@pytest.mark.parametrize("projection,d_target,d_teacher", [("identity", 2, 2), ("interpolate", 2, 9)])
def test_two_feature_layer_norm_is_as_accurate_as_torch_in_float32(projection, d_target, d_teacher):
    """Layer norm of two features is +-1 up to O(eps / difference^2): its gradient is a cancellation of O(1) terms,
    so float32 gets it only to ~1e-3; the fused kernel must be within 10x of letkit's torch path in float32."""
    generator = torch.Generator(device=DEVICE).manual_seed(d_teacher)
    target = torch.randn(6, d_target, generator=generator, device=DEVICE)
    teacher = torch.randn(6, d_teacher, generator=generator, device=DEVICE)
    grads = {}
    for name, dtype, backend in [("fused", torch.float32, "triton"), ("torch", torch.float32, "torch"), ("exact", torch.float64, "torch")]:
        leaf = target.detach().to(dtype).requires_grad_()
        alignment_loss(leaf, teacher.to(dtype), "smooth_l1", projection=projection, backend=backend).backward()
        grads[name] = leaf.grad.double()
    fused_error = (grads["fused"] - grads["exact"]).norm().item()
    torch_error = (grads["torch"] - grads["exact"]).norm().item()
    assert fused_error <= 10 * torch_error + 1e-12


def test_single_token_and_all_masked_batch():
    target = torch.randn(1, 16, device=DEVICE)
    teacher = torch.randn(1, 11, device=DEVICE)
    for kind in LOSS_KINDS:
        check_against_reference(target, teacher, kind, "interpolate")
        check_against_reference(target, teacher, kind, "interpolate", mask=torch.zeros(1, device=DEVICE))


def test_masked_tokens_are_skipped_even_when_non_finite():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    target = torch.randn(6, 20, generator=generator, device=DEVICE)
    teacher = torch.randn(6, 12, generator=generator, device=DEVICE)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    poisoned = target.clone()
    poisoned[~mask] = math.nan
    poisoned.requires_grad_()
    loss = fused_alignment_loss(poisoned, teacher, "cosine", projection="interpolate", mask=mask)
    loss.backward()
    expected = alignment_loss(target[mask].double(), teacher[mask].double(), "cosine", projection="interpolate", backend="torch")
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert torch.isfinite(poisoned.grad).all() and (poisoned.grad[~mask] == 0).all()


def test_strided_inputs_and_no_tokens():
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    wide = torch.randn(4, 3, 50, generator=generator, device=DEVICE)
    target = wide[..., 5:35]  # rows are not contiguous
    teacher = torch.randn(3, 4, 30, generator=generator, device=DEVICE).transpose(0, 1)
    check_against_reference(target, teacher, "smooth_l1", "identity")

    empty = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    loss = fused_alignment_loss(empty, torch.randn(0, 8, device=DEVICE), "mse")
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 8)


def test_no_grad_and_frozen_target_compute_the_loss_only():
    target = torch.randn(3, 8, device=DEVICE)
    teacher = torch.randn(3, 8, device=DEVICE)
    expected = alignment_loss(target.double(), teacher.double(), "cosine", backend="torch").item()
    assert not fused_alignment_loss(target, teacher, "cosine").requires_grad
    with torch.no_grad():
        loss = fused_alignment_loss(target.requires_grad_(), teacher, "cosine")
    assert not loss.requires_grad and abs(loss.item() - expected) <= 1e-5 * abs(expected)


def test_second_backward_through_the_same_graph_raises():
    target = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    loss = fused_alignment_loss(target, torch.randn(3, 8, device=DEVICE), "cosine")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_custom_op_passes_opcheck():
    """The op computes the gradient itself and is not differentiable: its inputs do not require grad here."""
    target = torch.randn(4, 12, device=DEVICE)
    teacher = torch.randn(4, 7, device=DEVICE)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEVICE)
    torch.library.opcheck(torch.ops.letkit.fused_interpolate_alignment.default, (target, teacher, mask, "smooth_l1", True, True))


def test_compiles_without_graph_breaks_through_alignment_loss():
    """torch.compile(fullgraph=True) of a model step calling letkit's public loss with backend='triton'."""
    import torch._dynamo

    def step(hidden, teacher, mask):
        return 0.5 * alignment_loss(torch.tanh(hidden), teacher, "cosine", projection="interpolate", mask=mask, backend="triton")

    generator = torch.Generator(device=DEVICE).manual_seed(2)
    hidden = torch.randn(2, 3, 20, generator=generator, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 3, 12, generator=generator, device=DEVICE)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], device=DEVICE)
    explanation = torch._dynamo.explain(step)(hidden, teacher, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(hidden, teacher, mask)
    (grad,) = torch.autograd.grad(loss, hidden)
    reference_hidden = hidden.detach().double().requires_grad_()
    reference = 0.5 * alignment_loss(
        torch.tanh(reference_hidden), teacher.double(), "cosine", projection="interpolate", mask=mask, backend="torch"
    )
    (reference_grad,) = torch.autograd.grad(reference, reference_hidden)
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    assert relative_error(grad, reference_grad) <= 1e-5


def test_bad_inputs_raise_errors_naming_the_argument():
    target = torch.randn(3, 8, device=DEVICE)
    teacher = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(TypeError, match="target has dtype torch.float64"):
        fused_alignment_loss(target.double(), teacher, "cosine")
    with pytest.raises(TypeError, match="mask must be"):
        fused_alignment_loss(target, teacher, "cosine", mask=torch.ones(3, dtype=torch.complex64, device=DEVICE))
    with pytest.raises(ValueError, match="teacher on meta"):
        fused_alignment_loss(target, torch.empty(3, 8, device="meta"), "cosine")
    with pytest.raises(ValueError, match="feature dims must be positive"):
        fused_alignment_loss(torch.randn(3, 0, device=DEVICE), torch.randn(3, 0, device=DEVICE), "cosine")
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_alignment_loss(target, teacher, "kl")
    with pytest.raises(ValueError, match="same tokens"):
        fused_alignment_loss(target, teacher[:2], "cosine")


def test_cpu_tensors_without_the_interpreter_are_refused_clearly():
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from letkit.kernels import fused_alignment_loss\n"
        "try:\n"
        "    fused_alignment_loss(torch.randn(2, 4), torch.randn(2, 4), 'cosine')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert "run on CUDA devices" in result.stdout and "got tensors on cpu" in result.stdout, result.stderr[-2000:]


def test_kernels_imported_by_an_earlier_test_module_still_run_under_the_interpreter(tmp_path):
    """tests/conftest.py switches the interpreter on before any test module is collected, so a module collected
    before the kernel tests may import letkit.kernels without breaking them."""
    import subprocess
    import sys

    early = tmp_path / "test_imports_kernels_first.py"
    early.write_text("import letkit.kernels\n\ndef test_nothing():\n    pass\n")
    # Selected with -k: a "file::test" argument would be collected first, whatever the order of the arguments.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(early), os.path.abspath(__file__),
               "-k", "test_nothing or test_single_token_and_all_masked_batch"]
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
