import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from letkit import AlignmentLoss, alignment_loss, interpolate_features
from letkit.losses import LOSS_KINDS


def reference_loss(target, teacher, kind, projection="identity", weight=None, bias=None, mask=None):
    """Independent float64 reference written from the definitions, one token at a time."""
    target, teacher = target.double().reshape(-1, target.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    keep = torch.ones(target.shape[0], dtype=torch.float64) if mask is None else mask.reshape(-1).double()
    d_in, d_out = target.shape[-1], teacher.shape[-1]
    total, count = 0.0, 0.0
    for i in range(target.shape[0]):
        h = target[i]
        if projection == "linear":
            h = weight.double() @ h + (0 if bias is None else bias.double())
        elif projection == "interpolate":
            out = torch.empty(d_out, dtype=torch.float64)
            for j in range(d_out):
                x = 0.0 if d_out == 1 else j * (d_in - 1) / (d_out - 1)
                lo = min(int(math.floor(x)), d_in - 1)
                hi = min(lo + 1, d_in - 1)
                out[j] = (1 - (x - lo)) * h[lo] + (x - lo) * h[hi]
            h = out
        t = teacher[i]
        if kind == "cosine":
            value = 1 - h.dot(t) / (max(h.norm(), 1e-8) * max(t.norm(), 1e-8))
        elif kind == "mse":
            value = ((h - t) ** 2).mean()
        else:
            a = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5)
            b = (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5)
            diff = (a - b).abs()
            value = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean()
        total = total + keep[i] * value
        count = count + keep[i]
    return total / max(count, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(LOSS_KINDS),
    projection=st.sampled_from(["identity", "interpolate", "linear"]),
    tokens=st.integers(1, 7),
    d_target=st.integers(1, 12),
    d_teacher=st.integers(1, 12),
    use_mask=st.booleans(),
    use_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_loss_matches_float64_reference(kind, projection, tokens, d_target, d_teacher, use_mask, use_bias, dtype, seed):
    if projection == "identity":
        d_teacher = d_target
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(tokens, d_target, generator=g).to(dtype)
    teacher = torch.randn(tokens, d_teacher, generator=g).to(dtype)
    weight = torch.randn(d_teacher, d_target, generator=g).to(dtype) if projection == "linear" else None
    bias = torch.randn(d_teacher, generator=g).to(dtype) if projection == "linear" and use_bias else None
    mask = torch.rand(tokens, generator=g) > 0.4 if use_mask else None
    got = alignment_loss(target, teacher, kind, projection=projection, weight=weight, bias=bias, mask=mask, backend="torch")
    want = reference_loss(target, teacher, kind, projection, weight, bias, mask)
    assert got.dtype == torch.float32
    # inputs are rounded to dtype before both computations, so only float32 compute error remains
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("projection", ["identity", "interpolate", "linear"])
def test_gradcheck_float64(kind, projection):
    torch.manual_seed(0)
    d_teacher = 5 if projection == "identity" else 3
    target = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, d_teacher, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    if projection == "linear":
        weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
        fn = lambda t, w, b: alignment_loss(t, teacher, kind, projection="linear", weight=w, bias=b, mask=mask, backend="torch")
        assert torch.autograd.gradcheck(fn, (target, weight, bias))
    else:
        fn = lambda t: alignment_loss(t, teacher, kind, projection=projection, mask=mask, backend="torch")
        assert torch.autograd.gradcheck(fn, (target,))


def test_cosine_matches_torch_cosine_similarity():
    torch.manual_seed(1)
    a, b = torch.randn(3, 6, 10), torch.randn(3, 6, 10)
    want = (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    torch.testing.assert_close(alignment_loss(a, b, "cosine"), want)
    assert alignment_loss(a, a, "cosine").abs() < 1e-6


def test_fully_masked_is_zero_with_zero_grad():
    target = torch.randn(2, 3, 4, requires_grad=True)
    loss = alignment_loss(target, torch.randn(2, 3, 4), mask=torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(target.grad) == 0


def test_masked_tokens_do_not_matter():
    torch.manual_seed(2)
    target, teacher = torch.randn(4, 8), torch.randn(4, 8)
    mask = torch.tensor([True, False, True, False])
    poisoned = target.clone()
    poisoned[~mask] = float("nan")
    poisoned.requires_grad_(True)
    loss = alignment_loss(poisoned, teacher, "mse", mask=mask)
    assert torch.equal(loss, alignment_loss(target, teacher, "mse", mask=mask))
    loss.backward()
    assert torch.isfinite(poisoned.grad).all() and torch.count_nonzero(poisoned.grad[~mask]) == 0


def test_interpolation_identity_and_exact_on_linear_signals():
    x = torch.randn(3, 7)
    assert interpolate_features(x, 7) is x
    for d_in, d_out in [(7, 3), (3, 11), (16, 5), (2, 9)]:
        a, b = torch.randn(2, 1, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
        signal = a + b * torch.linspace(0, 1, d_in, dtype=torch.float64)
        want = a + b * torch.linspace(0, 1, d_out, dtype=torch.float64)
        torch.testing.assert_close(interpolate_features(signal, d_out), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interpolation_keeps_the_input_dtype(dtype):
    x = torch.randn(4, 24).to(dtype)
    assert interpolate_features(x, 24) is x
    for size in (9, 40):
        out = interpolate_features(x, size)
        assert out.dtype == dtype and out.shape == (4, size)
        want = interpolate_features(x.double(), size)  # float64 reference, rounded once to dtype
        eps = torch.finfo(dtype).eps  # one rounding step, relative to |x| <~ 5
        torch.testing.assert_close(out, want.to(dtype), atol=5 * eps, rtol=eps)


def test_module_form_matches_functional():
    torch.manual_seed(3)
    a, b = torch.randn(5, 6), torch.randn(5, 4)
    w = torch.randn(4, 6)
    assert torch.equal(AlignmentLoss("smooth_l1")(a, b, projection="linear", weight=w), alignment_loss(a, b, "smooth_l1", projection="linear", weight=w))


# ---- bad input: a clear error naming the argument and the values ----


def test_error_batch_or_sequence_mismatch():
    with pytest.raises(ValueError, match=r"same tokens.*\(2, 5, 8\).*\(2, 6, 8\)"):
        alignment_loss(torch.randn(2, 5, 8), torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"\(2, 5, 8\).*\(3, 5, 8\)"):
        alignment_loss(torch.randn(2, 5, 8), torch.randn(3, 5, 8))


def test_error_projection_dims():
    with pytest.raises(ValueError, match="target dim 8 and teacher dim 4"):
        alignment_loss(torch.randn(5, 8), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(d_teacher, d_target\) = \(4, 8\).*got \(8, 4\)"):
        alignment_loss(torch.randn(5, 8), torch.randn(5, 4), projection="linear", weight=torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        alignment_loss(torch.randn(5, 8), torch.randn(5, 4), projection="linear", weight=torch.randn(4, 8), bias=torch.randn(8))
    with pytest.raises(ValueError, match="only used with projection='linear'"):
        alignment_loss(torch.randn(5, 8), torch.randn(5, 8), weight=torch.randn(8, 8))


def test_error_mask_shape():
    with pytest.raises(ValueError, match=r"mask must have the token shape.*\(2, 5\).*got \(2, 4\)"):
        alignment_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_error_non_finite_teacher(bad):
    teacher = torch.randn(2, 5, 8)
    teacher[1, 2, 3] = bad
    with pytest.raises(ValueError, match="teacher features contain 1 non-finite"):
        alignment_loss(torch.randn(2, 5, 8), teacher)
    assert not torch.isfinite(alignment_loss(torch.randn(2, 5, 8), teacher, check_finite=False))


def test_error_unknown_kind_projection_backend():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind must be one of.*'huber'"):
        alignment_loss(a, a, "huber")
    with pytest.raises(ValueError, match="kind must be one of"):
        AlignmentLoss("kl")
    with pytest.raises(ValueError, match="projection must be one of.*'pca'"):
        alignment_loss(a, a, projection="pca")
    with pytest.raises(ValueError, match="backend must be one of.*'cuda'"):
        alignment_loss(a, a, backend="cuda")


def test_triton_backend_unavailable_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend='triton' is not available for tensors on cpu"):
        alignment_loss(a, a, backend="triton")
    assert torch.equal(alignment_loss(a, a, backend="auto"), alignment_loss(a, a, backend="torch"))


@pytest.mark.parametrize(
    "bad, dtype",
    [(-1.0, torch.float32), (2.0, torch.float32), (0.5, torch.float32), (float("nan"), torch.float32),
     (-1, torch.int64), (2, torch.int64)],
)
def test_error_mask_values_outside_zero_and_one(bad, dtype):
    target, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=dtype)
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(or be a bool tensor: True keeps a token\), got 1 "
                                         rf"other values, e.g. \[{bad}\]"):
        alignment_loss(target, teacher, mask=mask)


def test_masks_of_bools_and_of_zeros_and_ones_agree():
    torch.manual_seed(4)
    target, teacher = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    keep = torch.rand(2, 5) > 0.5
    want = alignment_loss(target, teacher, mask=keep)
    for mask in (keep.long(), keep.float(), keep.to(torch.uint8), keep.double()):
        assert torch.equal(alignment_loss(target, teacher, mask=mask), want)


def test_error_mask_not_a_tensor():
    target, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    numpy = pytest.importorskip("numpy")
    for mask in ([[1, 1, 0], [1, 0, 1]], numpy.ones((2, 3), dtype=bool)):
        with pytest.raises(TypeError, match=r"mask must be a torch.Tensor of bools \(or of 0s and 1s\), got (list|ndarray): "
                                            r"convert it with torch.as_tensor\(mask, dtype=torch.bool\)"):
            alignment_loss(target, teacher, mask=mask)
    with pytest.raises(TypeError, match="mask must be a bool tensor .*got dtype torch.complex64"):
        alignment_loss(target, teacher, mask=torch.ones(2, 3, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_error_non_floating_features(dtype):
    good = torch.randn(2, 3, 4)
    bad = torch.ones(2, 3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=f"target features must be a floating-point tensor, got dtype {dtype}"):
        alignment_loss(bad, good)
    with pytest.raises(TypeError, match=f"teacher features must be a floating-point tensor, got dtype {dtype}"):
        alignment_loss(good, bad)


def test_error_features_on_different_devices():
    target, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="one device, got target on cpu and teacher on meta"):
        alignment_loss(target, teacher, check_finite=False)
    with pytest.raises(ValueError, match="mask must be on the target features' device, got target on cpu and mask on meta"):
        alignment_loss(target, target, mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="weight must be on the target features' device, got target on cpu and weight on meta"):
        alignment_loss(target, torch.randn(2, 3, 5), projection="linear", weight=torch.randn(5, 4, device="meta"))
