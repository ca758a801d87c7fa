"""Fused linear-projector alignment kernels vs the float64 torch reference (letkit.losses).

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
from letkit.kernels import fused_linear_alignment as fla
from letkit.losses import FUSED_GRAD_DTYPES, FUSED_TEACHER_DTYPES, LOSS_KINDS, alignment_loss


def make_problem(shape, d_target, d_teacher, dtype, *, bias, seed, weight_dtype=None, teacher_dtype=None):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    target = torch.randn(*shape, d_target, generator=generator, device=DEVICE).to(dtype)
    teacher = torch.randn(*shape, d_teacher, generator=generator, device=DEVICE).to(teacher_dtype or dtype)
    weight = (torch.randn(d_teacher, d_target, generator=generator, device=DEVICE) / math.sqrt(d_target)).to(weight_dtype or dtype)
    bias_ = torch.randn(d_teacher, generator=generator, device=DEVICE).to(weight_dtype or dtype) if bias else None
    return target, teacher, weight, bias_


def check_against_reference(target, teacher, weight, bias, kind, mask=None, grad_scale=1.0):
    """Fused vs float64 torch loss and gradients (target, weight, bias), within the dtype's tolerance (or, for
    ill-conditioned gradients, as close as letkit's float32 torch path)."""
    leaves = [x.detach().requires_grad_() for x in (target, weight) + ((bias,) if bias is not None else ())]

    def run(tensors, teacher_, backend):
        bias_ = tensors[2] if bias is not None else None
        loss = alignment_loss(tensors[0], teacher_, kind, projection="linear", weight=tensors[1], bias=bias_, mask=mask, backend=backend)
        (loss * grad_scale).backward()
        return loss, [x.grad for x in tensors]

    with poisoned_allocations():
        loss, grads = run(leaves, teacher, "triton")
    reference, reference_grads = run([x.detach().double().requires_grad_() for x in leaves], teacher.double(), "torch")
    _, torch_grads = run([x.detach().clone().requires_grad_() for x in leaves], teacher, "torch")

    tolerance = max(TOLERANCE[x.dtype] for x in leaves)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Plus an absolute LOSS_ATOL: 1 - cos of nearly parallel features is computed next to 1, where float32 resolves ~1e-7.
    assert abs(loss.item() - reference.item()) <= tolerance * abs(reference.item()) + LOSS_ATOL
    for leaf, grad, expected, torch_grad in zip(leaves, grads, reference_grads, torch_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        assert_gradient_close(grad, expected, tolerance, torch_grad)


@st.composite
def problems(draw):
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    tokens = batch * seq
    mask_pattern = draw(st.sampled_from(["none", "random", "all_masked", "float_0_1"]))
    mask = {
        "none": None,
        "random": torch.rand(tokens, device=DEVICE) < 0.6,
        "all_masked": torch.zeros(tokens, dtype=torch.bool, device=DEVICE),
        "float_0_1": (torch.rand(tokens, device=DEVICE) < 0.6).float(),
    }[mask_pattern]
    dtype = draw(st.sampled_from(FUSED_GRAD_DTYPES))
    # bf16 dL/dz is rounded to the input dtype before the tensor-core GEMMs (as in any bf16 autograd graph);
    # with only a few dims, dL/dh = dL/dz @ W can be a cancellation of a handful of rounded terms that
    # exceeds the 1e-2 budget by itself, so bf16 problems use at least 8 dims.
    smallest_dim = 1 if dtype == torch.float32 else 8
    return dict(
        kind=draw(st.sampled_from(LOSS_KINDS)),
        dtype=dtype,
        teacher_dtype=draw(st.sampled_from(FUSED_TEACHER_DTYPES)),
        shape=(batch, seq),
        d_target=draw(st.integers(smallest_dim, 48)),
        d_teacher=draw(st.integers(smallest_dim, 48)),
        bias=draw(st.booleans()),
        mask=None if mask is None else mask.reshape(batch, seq),
        # Fewer tokens per chunk than tokens forces several chunks (and a ragged last one).
        chunks=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=20, deadline=None)
@given(problems())
def test_matches_float64_reference(problem):
    assume(not ill_conditioned(problem["kind"], "linear", problem["d_target"], problem["d_teacher"], problem["bias"]))
    target, teacher, weight, bias = make_problem(
        problem["shape"], problem["d_target"], problem["d_teacher"], problem["dtype"], bias=problem["bias"], seed=problem["seed"],
        teacher_dtype=problem["teacher_dtype"],
    )
    tokens_per_chunk = -(-target[..., 0].numel() // problem["chunks"])
    with mock.patch.object(fla, "CHUNK_ELEMENTS", tokens_per_chunk * problem["d_teacher"]):
        check_against_reference(target, teacher, weight, bias, problem["kind"], problem["mask"])


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_mixed_dtypes_and_scaled_grad(kind):
    # bf16 activations with an fp32 master-weight projector and an fp16 teacher: the GEMMs run in fp32.
    target, teacher, weight, bias = make_problem(
        (2, 3), 20, 12, torch.bfloat16, bias=True, seed=3, weight_dtype=torch.float32, teacher_dtype=torch.float16
    )
    check_against_reference(target, teacher, weight, bias, kind, grad_scale=-0.75)


def test_flat_losses_have_near_zero_gradients():
    """The ``ill_conditioned`` cases: exact zero gradients are float32 noise only (genuine ones here are ~1e-2),
    and the two-feature layer norm (a cancellation of O(1) terms) is within 10x of letkit's torch path in float32."""
    # cosine of a 1-dim projection is +-1: no gradient anywhere.
    target, teacher, weight, bias = make_problem((6,), 9, 1, torch.float32, bias=True, seed=12)
    leaves = [x.requires_grad_() for x in (target, weight, bias)]
    fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight, bias=bias).backward()
    assert max(x.grad.abs().max().item() for x in leaves) <= 1e-5

    # A bias-free projection of one feature only scales a fixed direction: no gradient for the target.
    target, teacher, weight, _ = make_problem((6,), 1, 7, torch.float32, bias=False, seed=13)
    target.requires_grad_()
    fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight).backward()
    assert target.grad.abs().max().item() <= 1e-5

    target, teacher, weight, bias = make_problem((6,), 5, 2, torch.float32, bias=True, seed=14)
    grads = {}
    for name, dtype, backend in [("fused", torch.float32, "triton"), ("torch", torch.float32, "torch"), ("exact", torch.float64, "torch")]:
        leaves = [x.detach().to(dtype).requires_grad_() for x in (target, weight, bias)]
        alignment_loss(leaves[0], teacher.to(dtype), "smooth_l1", projection="linear", weight=leaves[1], bias=leaves[2], backend=backend).backward()
        grads[name] = [x.grad.double() for x in leaves]
    for fused, reference, exact in zip(grads["fused"], grads["torch"], grads["exact"]):
        assert (fused - exact).norm().item() <= 10 * (reference - exact).norm().item() + 1e-12


def test_single_token_and_all_masked_batch():
    target, teacher, weight, bias = make_problem((1,), 17, 9, torch.float32, bias=True, seed=4)
    for kind in LOSS_KINDS:
        check_against_reference(target, teacher, weight, bias, kind)
        check_against_reference(target, teacher, weight, bias, kind, mask=torch.zeros(1, dtype=torch.bool, device=DEVICE))


def test_only_the_requested_gradients_are_computed():
    target, teacher, weight, bias = make_problem((4,), 10, 6, torch.float32, bias=True, seed=5)
    weight.requires_grad_()
    loss = fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight, bias=bias)
    loss.backward()
    reference_weight = weight.detach().double().requires_grad_()
    alignment_loss(
        target.double(), teacher.double(), "cosine", projection="linear", weight=reference_weight, bias=bias.double(), backend="torch"
    ).backward()
    assert target.grad is None and bias.grad is None
    assert relative_error(weight.grad, reference_weight.grad) <= 1e-5

    with torch.no_grad():
        loss = fused_alignment_loss(target.requires_grad_(), teacher, "mse", projection="linear", weight=weight, bias=bias)
    expected = alignment_loss(
        target.double(), teacher.double(), "mse", projection="linear", weight=weight.double(), bias=bias.double(), backend="torch"
    )
    assert not loss.requires_grad and abs(loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_no_tokens_give_zero_loss_and_gradients():
    target, teacher, weight, _ = make_problem((0,), 8, 5, torch.float32, bias=False, seed=6)
    target.requires_grad_()
    weight.requires_grad_()
    loss = fused_alignment_loss(target, teacher, "smooth_l1", projection="linear", weight=weight)
    loss.backward()
    assert loss.item() == 0.0 and target.grad.shape == (0, 8) and (weight.grad == 0).all()


def test_second_backward_through_the_same_graph_raises():
    target, teacher, weight, _ = make_problem((3,), 8, 5, torch.float32, bias=False, seed=7)
    weight.requires_grad_()
    loss = fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("kind,weight_layout", [("cosine", "contiguous"), ("mse", "transposed")])
def test_custom_op_passes_opcheck(kind, weight_layout):
    """Fake (meta) outputs must match the real ones in shape, dtype and strides, also for a non-contiguous weight.
    The op computes the gradients itself and is not differentiable: its inputs do not require grad here."""
    target, teacher, weight, bias = make_problem((5,), 12, 7, torch.float32, bias=True, seed=8)
    if weight_layout == "transposed":
        weight = weight.t().contiguous().t()
        assert not weight.is_contiguous()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], device=DEVICE)
    torch.library.opcheck(
        torch.ops.letkit.fused_linear_alignment.default, (target, teacher, weight, bias, mask, kind, True, True, True)
    )


def test_backward_scales_the_forward_gradients_in_place():
    """Backward multiplies the gradients computed in the forward by the incoming gradient in their own buffers:
    no second pass writing new tokens x d tensors."""
    target, teacher, weight, bias = make_problem((5,), 12, 7, torch.float32, bias=True, seed=17)
    leaves = [x.requires_grad_() for x in (target, weight, bias)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight, bias=bias)
    unscaled = [x.detach().clone() for x in saved]
    grads = torch.autograd.grad(loss * -2.5, leaves)
    assert len(saved) == 3
    for grad, forward_grad, expected in zip(grads, saved, unscaled):
        assert grad.data_ptr() == forward_grad.data_ptr()
        assert torch.equal(grad, expected * -2.5)


def test_compiled_backward_scales_in_place_like_eager():
    """One autograd path: the backward torch.compile builds runs the same in-place scale as eager (inductor then
    reuses the saved buffer), not a separate ``grad * grad_loss``."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def keep_backward(graph, example_inputs):
        backward_graphs.append(graph.code)
        return graph

    backend = aot_autograd(fw_compiler=lambda graph, example_inputs: graph, bw_compiler=keep_backward)
    target, teacher, weight, bias = make_problem((4,), 12, 7, torch.float32, bias=True, seed=18)
    leaves = [x.requires_grad_() for x in (target, weight, bias)]

    def step(target_, weight_, bias_):
        return 0.5 * alignment_loss(target_, teacher, "cosine", projection="linear", weight=weight_, bias=bias_, backend="triton")

    torch._dynamo.reset()
    torch.compile(step, backend=backend, fullgraph=True)(*leaves).backward()
    assert len(backward_graphs) == 1 and backward_graphs[0].count("letkit.scale_") == 3, backward_graphs
def test_compiles_without_graph_breaks_through_alignment_loss():
    """torch.compile(fullgraph=True) of a model step calling letkit's public loss with backend='triton'."""
    import torch._dynamo

    projector = torch.nn.Linear(16, 10).to(DEVICE)

    def step(hidden, teacher):
        return 0.5 * alignment_loss(
            torch.tanh(hidden), teacher, "smooth_l1", projection="linear", weight=projector.weight, bias=projector.bias, backend="triton"
        )

    generator = torch.Generator(device=DEVICE).manual_seed(9)
    hidden = torch.randn(2, 3, 16, generator=generator, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 3, 10, generator=generator, device=DEVICE)
    explanation = torch._dynamo.explain(step)(hidden, teacher)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(hidden, teacher)
    grads = torch.autograd.grad(loss, [hidden, projector.weight, projector.bias])
    reference_leaves = [x.detach().double().requires_grad_() for x in (hidden, projector.weight, projector.bias)]
    reference = 0.5 * alignment_loss(
        torch.tanh(reference_leaves[0]), teacher.double(), "smooth_l1", projection="linear",
        weight=reference_leaves[1], bias=reference_leaves[2], backend="torch",
    )
    reference_grads = torch.autograd.grad(reference, reference_leaves)
    assert abs(loss.item() - reference.item()) <= 1e-5 * abs(reference.item())
    for grad, expected in zip(grads, reference_grads):
        assert relative_error(grad, expected) <= 1e-5


def test_bad_inputs_raise_errors_naming_the_argument():
    target, teacher, weight, bias = make_problem((3,), 8, 5, torch.float32, bias=True, seed=10)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
        fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight.double())
    with pytest.raises(TypeError, match="bias has dtype torch.int64"):
        fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight, bias=bias.long())
    with pytest.raises(ValueError, match="weight on meta"):
        fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight.to("meta"))
    with pytest.raises(ValueError, match=r"weight must have shape \(d_teacher, d_target\) = \(5, 8\)"):
        fused_alignment_loss(target, teacher, "cosine", projection="linear", weight=weight.t())
    with pytest.raises(ValueError, match="projection='linear' needs weight"):
        fused_alignment_loss(target, teacher, "cosine", projection="linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuned tensor-core path needs CUDA")
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_cuda_tensor_core_path_on_ragged_shapes(kind):
    target, teacher, weight, bias = make_problem((3, 173), 200, 72, torch.bfloat16, bias=True, seed=11)
    mask = torch.rand(3, 173, device=DEVICE) < 0.8
    with mock.patch.object(fla, "CHUNK_ELEMENTS", 72 * 128):
        check_against_reference(target, teacher, weight, bias, kind, mask)


SM90_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from letkit.kernels import alignment_common, fused_interpolate_alignment, fused_linear_alignment

def compile_sm90(kernel, types, constexprs, num_warps, num_stages=3, tensor_cores=False):
    # Pointers and strides marked 16-divisible, as Triton specialises them at launch.
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if signature[name][0] == "*" or name.startswith("stride")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    assert not tensor_cores or "wgmma" in compiled.asm["ptx"], "the bf16 projection GEMM must use Hopper wgmma"

ints = ["n_rows", "rows_bucket", "d_in", "d_out", "adj_taps", "stride_x", "stride_teacher", "stride_grad", "stride_h", "stride_w", "stride_out", "stride_loss_part", "n_elements"]
types = dict.fromkeys(ints, "i32")
types.update(x_ptr="*bf16", teacher_ptr="*bf16", lo_ptr="*i32", hi_ptr="*i32", frac_ptr="*fp32", adj_first_ptr="*i32", adj_count_ptr="*i32",
             token_weight_ptr="*fp32", denom_ptr="*fp32", loss_ptr="*fp32", grad_ptr="*bf16", h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16",
             out_ptr="*fp32", loss_part_ptr="*fp32", factor_ptr="*fp32")
compile_sm90(alignment_common._scale_inplace_kernel, types, {"BLOCK": 4096}, 4)
for kind, interpolate in [(0, True), (1, False)]:
    unused = {} if interpolate else dict.fromkeys(["lo_ptr", "hi_ptr", "frac_ptr", "adj_first_ptr", "adj_count_ptr"])
    compile_sm90(fused_interpolate_alignment._row_alignment_kernel, types,
                 dict(KIND=kind, INTERPOLATE=interpolate, HAS_MASK=True, COMPUTE_GRAD=True, BLOCK_ROWS=2, BLOCK_OUT=1024, BLOCK_IN=1024, **unused), 8)
tile = fused_linear_alignment._GEMM_CONFIGS[0]
common = dict(DOT_DTYPE=tl.bfloat16, INPUT_PRECISION="ieee", HAS_MASK=True, COMPUTE_GRAD=True, LOSS_SLOT=fused_linear_alignment._LOSS_SLOT, **tile.kwargs)
compile_sm90(fused_linear_alignment._linear_projection_kernel, types,
             dict(HAS_BIAS=True, FUSE_MSE=False, teacher_ptr=None, token_weight_ptr=None, denom_ptr=None, loss_part_ptr=None, **common),
             tile.num_warps, tile.num_stages, tensor_cores=True)
compile_sm90(fused_linear_alignment._linear_projection_kernel, dict(types, out_ptr="*bf16"), dict(HAS_BIAS=False, FUSE_MSE=True, b_ptr=None, **common),
             tile.num_warps, tile.num_stages, tensor_cores=True)
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not exercise Triton's compiler; build the key specialisations for an H100 offline."""
    import subprocess
    import sys

    import triton

    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")):
        pytest.skip("this Triton build has no NVIDIA backend")
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE_SCRIPT], env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def tuned_projection(block_ns, bench_calls):
    """The projection kernel autotuned over tiles of width ``block_ns`` (the first tried first); the stub benchmark
    runs each config once, as a real one does, and makes the last config the fastest."""
    import triton

    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 16, "GROUP_M": 2}) for block_n in block_ns]

    def bench(kernel_call, quantiles):
        kernel_call()
        bench_calls.append(1)
        time_ms = float(len(configs) - (len(bench_calls) - 1) % len(configs))
        return [time_ms] * len(quantiles)

    return triton.autotune(configs=configs, key=fla._linear_projection_tuned.keys, do_bench=bench)(fla._linear_projection_kernel)


def test_autotuned_mse_loss_is_exact_on_the_first_call():
    """Tuning runs every config on the real buffers; a wider winning tile must not leave the narrower configs'
    partial losses behind (they inflated the first call's loss for each autotune key)."""
    target, teacher, weight, bias = make_problem((8,), 24, 40, torch.float32, bias=True, seed=15)
    bench_calls = []
    with mock.patch.object(fla, "_linear_projection_tuned", tuned_projection([16, 32], bench_calls)), mock.patch.object(
        fla, "INTERPRETED", False
    ):
        check_against_reference(target, teacher, weight, bias, "mse")
    assert len(bench_calls) == 2  # the tuned path really ran


def test_autotuning_is_shared_by_token_counts_of_one_power_of_two():
    """A new token count must not re-tune (each tuning compiles and times every config): chunks of 20 and 23
    tokens share one tuning, 40 tokens gets its own."""
    bench_calls = []
    with mock.patch.object(fla, "_linear_projection_tuned", tuned_projection([16, 32], bench_calls)), mock.patch.object(
        fla, "INTERPRETED", False
    ):
        for tokens, tunings in [(20, 1), (23, 1), (40, 2)]:
            target, teacher, weight, _ = make_problem((tokens,), 16, 8, torch.float32, bias=False, seed=tokens)
            fused_alignment_loss(target, teacher, "mse", projection="linear", weight=weight)
            assert len(bench_calls) == 2 * tunings, tokens


def test_bf16_activations_with_an_fp32_weight_follow_autocast():
    """bf16 activations with an fp32 (master) projector weight: as under autocast, the projection runs in bf16
    (the weight rounded once; bf16 tensor-core GEMMs accumulating in fp32), not as an fp32 FMA GEMM, and the
    weight's gradient stays fp32. The teacher is the exact fp32-weight projection, so the MSE is ~0 with an fp32
    GEMM and the weight's rounding error with a bf16 one."""
    target, _, weight, bias = make_problem((4, 6), 64, 32, torch.bfloat16, bias=True, seed=16, weight_dtype=torch.float32)
    teacher = torch.nn.functional.linear(target.double(), weight.double(), bias.double()).float()
    leaves = [x.detach().requires_grad_() for x in (target, weight, bias)]
    loss = fused_alignment_loss(leaves[0], teacher, "mse", projection="linear", weight=leaves[1], bias=leaves[2])
    loss.backward()

    leaves64 = [target.double().requires_grad_(), weight.bfloat16().double().requires_grad_(), bias.double().requires_grad_()]
    autocast = alignment_loss(leaves64[0], teacher.double(), "mse", projection="linear", weight=leaves64[1], bias=leaves64[2], backend="torch")
    autocast.backward()
    assert autocast.item() > 1e-8
    assert abs(loss.item() - autocast.item()) <= 1e-3 * autocast.item()
    assert leaves[1].grad.dtype == torch.float32 and leaves[2].grad.dtype == torch.float32
    for leaf, expected in zip(leaves, [x.grad for x in leaves64]):
        assert_gradient_close(leaf.grad, expected, TOLERANCE[torch.bfloat16])
