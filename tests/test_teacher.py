import pytest
import torch

from letkit import TeacherFeatureExtractor
from nested_block_lists import Stack


def test_features_of_blocks_paths_and_final_hidden_state(tiny_lm):
    model = tiny_lm(layers=3)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        x = model.embed(ids)
        outs = []
        for block in model.blocks:
            x = block(x)
            outs.append(x)
        final = model.final_norm(x)
    extractor = TeacherFeatureExtractor(model, layers=[0, -2, "blocks.2", -1])
    feats = extractor(ids)
    assert len(feats) == 4
    torch.testing.assert_close(feats[0], outs[0])
    torch.testing.assert_close(feats[1], outs[1])
    torch.testing.assert_close(feats[2], outs[2])  # the last block's own output, before the final norm
    torch.testing.assert_close(feats[3], final)  # "last layer" = final hidden state, after the final norm
    assert not any(f.requires_grad or f.is_inference() for f in feats)


def test_frozen_and_stops_before_the_lm_head(tiny_lm):
    model = tiny_lm()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    extractor = TeacherFeatureExtractor(model, layers=[-1])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    extractor(torch.randint(0, 50, (1, 4)))
    assert calls == []
    full = TeacherFeatureExtractor(model, layers=[-1], stop_early=False)
    calls.clear()  # construction probed the teacher for causality
    full(torch.randint(0, 50, (1, 4)))
    assert calls == ["head"]


def test_the_given_model_is_converted_in_place(tiny_lm):
    model = tiny_lm()
    extractor = TeacherFeatureExtractor(model, dtype=torch.float64)
    assert extractor.model is model and model.embed.weight.dtype == torch.float64


def test_dtype_placement(tiny_lm):
    extractor = TeacherFeatureExtractor(tiny_lm(), layers=[1], dtype=torch.bfloat16)
    assert extractor(torch.randint(0, 50, (1, 4)))[0].dtype == torch.bfloat16


def test_release(tiny_lm):
    extractor = TeacherFeatureExtractor(tiny_lm())
    extractor.release()
    assert extractor.released
    with pytest.raises(RuntimeError, match="released"):
        extractor(torch.randint(0, 50, (1, 4)))


def test_bad_layers(tiny_lm):
    model = tiny_lm(layers=3)
    with pytest.raises(ValueError, match=r"teacher layer index 3 does not exist.*'blocks' has 3 blocks \(valid indices -3 .. 2\)"):
        TeacherFeatureExtractor(model, layers=[3])
    with pytest.raises(ValueError, match=r"module path 'block.1' does not exist in TinyLM; closest valid paths: \['blocks.1'"):
        TeacherFeatureExtractor(model, layers=["block.1"])
    with pytest.raises(TypeError, match="int block index or a str module path"):
        TeacherFeatureExtractor(model, layers=[1.5])
    with pytest.raises(ValueError, match="block list 'embed' must be an nn.ModuleList"):
        TeacherFeatureExtractor(model, block_list="embed")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        TeacherFeatureExtractor(lambda x: x)


def test_bidirectional_teacher_is_refused(tiny_lm):
    model = tiny_lm()
    TeacherFeatureExtractor(model)  # the tiny LM is causal

    class Bidirectional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids.flip(1))  # position t now depends on tokens after t

    with pytest.raises(ValueError, match="not causal: its layer -1 features at earlier positions change \\(by up to .* of their norm\\)"):
        TeacherFeatureExtractor(Bidirectional())
    TeacherFeatureExtractor(Bidirectional(), check_causal=False)


def test_bert_encoder_from_transformers_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="BERT-family encoder"):
        TeacherFeatureExtractor.from_pretrained(tmp_path)


def test_ambiguous_final_norm_is_an_error_not_a_silent_choice():
    class TwoNorms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
            self.norm = torch.nn.LayerNorm(4)
            self.ln_f = torch.nn.LayerNorm(4)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.ln_f(self.norm(x))

    with pytest.raises(ValueError, match=r"several final-norm candidates \['norm', 'ln_f'\]"):
        TeacherFeatureExtractor(TwoNorms(), layers=[-1])
    assert TeacherFeatureExtractor(TwoNorms(), layers=["ln_f"]).layers == ["ln_f"]


def test_block_discovery_prefers_the_outermost_list_over_a_longer_nested_one():
    extractor = TeacherFeatureExtractor(Stack({"layers": 2}), layers=[0])  # each block holds 6 experts
    assert extractor.block_list_path == "layers" and extractor.num_layers == 2


def test_block_discovery_prefers_blocks_over_a_longer_list_of_leaf_modules():
    extractor = TeacherFeatureExtractor(Stack({"layers": 2}, leaf_lists={"heads": 5}), layers=[0])
    assert extractor.block_list_path == "layers"


def test_block_discovery_refuses_to_guess_between_two_lists_of_blocks():
    model = Stack({"encoder": 3, "decoder": 2})
    with pytest.raises(ValueError, match=r"Stack has several lists of blocks that could be its transformer blocks: "
                                         r"'encoder' \(3 x Experts\), 'decoder' \(2 x Experts\). Pass the one to use as "
                                         r"block_list=, e.g. block_list='encoder'"):
        TeacherFeatureExtractor(model)
    assert TeacherFeatureExtractor(model, block_list="decoder").num_layers == 2


class Wrapping(torch.nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


@pytest.mark.parametrize(
    "wrap, described",
    [
        (lambda h: {"hidden": h, "aux": h.sum()}, r"a dict with keys \['hidden', 'aux'\]"),
        (lambda h: None, "None"),
        (lambda h: ("hidden", h), r"a tuple of \(str, Tensor\)"),
    ],
)
def test_a_layer_returning_no_tensor_is_named_with_the_fix(wrap, described):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.blocks = torch.nn.ModuleList(Wrapping(wrap) for _ in range(2))

        def forward(self, ids):
            return self.blocks[1](self.blocks[0](self.embed(ids)))  # never reached past the first block here

    ids = torch.randint(0, 50, (1, 4))
    with pytest.raises(TypeError, match=rf"teacher layer 0 \(module 'blocks.0', Wrapping\) returned {described}, not a tensor "
                                        r"or a tuple/list whose first item is one: pass the module path of the submodule "
                                        r"whose output is the hidden state instead, e.g. layers=\['blocks.0.<child>'\]"):
        TeacherFeatureExtractor(Model(), layers=[0], check_causal=False)(ids)
    (features,) = TeacherFeatureExtractor(Model(), layers=["blocks.0.inner"], check_causal=False)(ids)
    assert features.shape == (1, 4, 8)
