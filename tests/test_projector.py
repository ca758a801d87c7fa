import pytest
import torch

from letkit import AlignmentLoss, LayerMappingProjector, alignment_loss


@pytest.mark.parametrize("kind", ["interpolate", "linear", "mlp"])
def test_shapes_and_fused_loss_equals_unfused(kind):
    torch.manual_seed(0)
    projector = LayerMappingProjector([16, 16], [8, 16], kind)
    target = [torch.randn(2, 5, 16), torch.randn(2, 5, 16)]
    teacher = [torch.randn(2, 5, 8), torch.randn(2, 5, 16)]
    projected = projector(target)
    assert [p.shape[-1] for p in projected] == [8, 16]
    mask = torch.rand(2, 5) > 0.3
    fused = projector.alignment_loss(target, teacher, AlignmentLoss("cosine"), mask)
    unfused = sum(alignment_loss(p, t, mask=mask) for p, t in zip(projected, teacher)) / 2
    torch.testing.assert_close(fused, unfused)
    for pair, s, t in zip(projector.projectors, target, teacher):  # the per-pair interface alignment_loss calls
        want = alignment_loss(pair(s), t, "smooth_l1", mask=mask)
        torch.testing.assert_close(pair.loss(s, t, AlignmentLoss("smooth_l1"), mask), want)
        torch.testing.assert_close(pair.loss(target=s, teacher=t, loss_fn=AlignmentLoss("smooth_l1"), mask=mask), want)


def test_interpolate_equal_dims_is_identity_and_has_no_parameters():
    projector = LayerMappingProjector([12], [12], "interpolate")
    x = torch.randn(3, 12)
    assert projector([x])[0] is x
    assert len(list(projector.parameters())) == 0


def test_learned_projector_gets_gradients():
    projector = LayerMappingProjector([6], [4], "linear")
    loss = projector.alignment_loss([torch.randn(3, 6)], [torch.randn(3, 4)], AlignmentLoss("mse"))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())


def test_errors():
    with pytest.raises(ValueError, match="kind must be one of.*'conv'"):
        LayerMappingProjector([4], [4], "conv")
    with pytest.raises(ValueError, match=r"one entry per layer pair, got \[4, 4\] and \[4\]"):
        LayerMappingProjector([4, 4], [4])
    projector = LayerMappingProjector([16], [8], "linear")
    with pytest.raises(ValueError, match=r"pair 0 was built for target dim 16, but the target features have shape \(3, 12\)"):
        projector([torch.randn(3, 12)])
    with pytest.raises(ValueError, match=r"pair 0 was built for teacher dim 8, but the teacher features have shape \(3, 6\)"):
        projector.alignment_loss([torch.randn(3, 16)], [torch.randn(3, 6)], AlignmentLoss())
    with pytest.raises(ValueError, match="expected 1 target feature tensors"):
        projector([torch.randn(3, 16), torch.randn(3, 16)])


def test_mlp_hidden_width():
    projector = LayerMappingProjector([6, 12], [4, 4], "mlp", mlp_hidden=10)
    assert [(p.fc_in.out_features, p.fc_out.in_features) for p in projector.projectors] == [(10, 10), (10, 10)]
    default = LayerMappingProjector([6, 12], [4, 4], "mlp")
    assert [p.fc_in.out_features for p in default.projectors] == [6, 12]
    with pytest.raises(ValueError, match="mlp_hidden is the hidden width of kind='mlp' projectors, got kind='linear'"):
        LayerMappingProjector([6], [4], "linear", mlp_hidden=10)
    with pytest.raises(ValueError, match="mlp_hidden must be >= 1 or None, got 0"):
        LayerMappingProjector([6], [4], "mlp", mlp_hidden=0)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match=rf"mlp_hidden must be an int or None, got {type(bad).__name__} \({bad!r}\)"):
            LayerMappingProjector([6], [4], "mlp", mlp_hidden=bad)
