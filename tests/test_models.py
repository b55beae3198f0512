"""StochasticMlp, stochastify on timm models, state-dict compatibility, create_model and predict_proba."""

from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import timm
import torch
from scipy import stats
from timm.layers import Mlp
from torch import nn

import stochvit
from stochvit import (
    StochasticLinear,
    StochasticMlp,
    create_model,
    destochastify,
    predict_proba,
    sample_probs,
    sampling,
    stochastify,
)
from stochvit.errors import UserError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def _built(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False, img_size=32, num_classes=5).eval()


def small_timm(name: str) -> nn.Module:
    """A fresh copy of a timm ImageNet architecture at 32x32 (4 patches): full depth and width, fast forward passes.

    Copies of one built model (timm's weight init costs more than the tests themselves); they share the same weights.
    """
    return copy.deepcopy(_built(name))


# -- StochasticMlp -------------------------------------------------------------------------------


def test_stochastic_mlp_accepts_timm_mlp_keywords():
    kw = dict(hidden_features=32, out_features=8, act_layer=nn.ReLU, norm_layer=nn.LayerNorm, bias=(True, False), drop=0.1)
    layer = dict(kind="diagonal", distribution="gaussian", low=0.8, high=1.2, sharing="batch")
    mlp = StochasticMlp(16, position="post_act", **layer, **kw)
    plain = Mlp(16, **kw)
    assert isinstance(mlp, Mlp)
    assert isinstance(mlp.act, nn.ReLU) and isinstance(mlp.norm, nn.LayerNorm)
    assert mlp.fc2.bias is None and mlp.fc1.bias is not None
    assert mlp.drop1.p == 0.1
    assert {k: v.shape for k, v in mlp.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    s = mlp.stochastic
    assert (s.features, s.kind, s.distribution, s.low, s.high, s.sharing) == (32, "diagonal", "gaussian", 0.8, 1.2, "batch")
    assert mlp(torch.randn(2, 3, 16)).shape == (2, 3, 8)


def test_stochastic_mlp_refuses_conv_and_unknown_position():
    with pytest.raises(ValueError, match="use_conv"):
        StochasticMlp(8, use_conv=True)
    with pytest.raises(ValueError, match="position"):
        StochasticMlp(8, position="middle")


@pytest.mark.parametrize("position", ["pre_act", "post_act", "output"])
def test_positions_place_the_layer_where_documented(position):
    mlp = StochasticMlp(16, hidden_features=32, out_features=8, position=position).eval()
    seen = {}
    # the MLP lets the layer scale its own intermediate in place, so the input is captured (cloned) before forward
    mlp.stochastic.register_forward_pre_hook(lambda m, inp: seen.update(inp=inp[0].clone()))
    mlp.stochastic.register_forward_hook(lambda m, inp, out: seen.update(out=out))
    x = torch.randn(2, 5, 16)
    y = mlp(x)
    h = mlp.fc1(x)
    expected_input = {"pre_act": h, "post_act": mlp.act(h), "output": mlp.fc2(mlp.act(h))}[position]
    assert torch.allclose(seen["inp"], expected_input, atol=1e-6)
    assert mlp.stochastic.features == (8 if position == "output" else 32)
    rest = {"pre_act": lambda t: mlp.fc2(mlp.act(t)), "post_act": mlp.fc2, "output": lambda t: t}[position]
    assert torch.allclose(y, rest(seen["out"]), atol=1e-6)
    assert not torch.allclose(seen["out"], seen["inp"]), "the layer must act"


# -- stochastify ---------------------------------------------------------------------------------


def plain_mlps(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is Mlp]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_stochastify_converts_every_mlp_and_keeps_weights(name):
    model = small_timm(name)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n = len(plain_mlps(model))
    assert n == len(model.blocks) == 12
    assert stochastify(model, distribution="gaussian", sharing="batch") == n
    assert plain_mlps(model) == []
    assert all(isinstance(b.mlp, StochasticMlp) and b.mlp.stochastic.distribution == "gaussian" for b in model.blocks)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before, "conversion must reuse the same tensors"
    assert stochastify(model) == 0, "already converted"
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(model(x), model(x))


def test_stochastify_honours_blocks():
    model = small_timm("vit_tiny_patch16_224")
    assert stochastify(model, blocks=[0, 2, -1], position="output") == 3
    converted = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, StochasticMlp)]
    assert converted == [0, 2, 11]
    assert all(model.blocks[i].mlp.position == "output" for i in converted)
    with pytest.raises(ValueError, match="blocks"):
        stochastify(small_timm("vit_tiny_patch16_224"), blocks=[12])
    with pytest.raises(ValueError, match="low"):
        stochastify(small_timm("vit_tiny_patch16_224"), low=3.0, high=1.0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_state_dicts_load_both_ways_and_off_mode_matches_plain(name):
    plain = small_timm(name)
    stoch = small_timm(name)
    stochastify(stoch, kind="diagonal", distribution="bernoulli")
    assert plain.state_dict().keys() == stoch.state_dict().keys()
    with torch.no_grad():
        for p in plain.parameters():  # copies start equal: make the loaded weights distinguishable
            p.add_(0.01 * torch.randn_like(p))
    stoch.load_state_dict(plain.state_dict())  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), sampling(stoch, "off"):
        assert torch.equal(stoch(x), plain(x))
    # and back: weights trained in the stochastic model load into a plain timm model
    with torch.no_grad():
        for p in stoch.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = small_timm(name)
    assert not torch.equal(fresh.blocks[0].mlp.fc1.weight, stoch.blocks[0].mlp.fc1.weight)
    fresh.load_state_dict(stoch.state_dict())
    with torch.no_grad(), sampling(stoch, "off"):
        assert torch.equal(stoch(x), fresh(x))
    # destochastify gives the plain architecture back with the same weights
    assert destochastify(stoch) == 12 and len(plain_mlps(stoch)) == 12
    with torch.no_grad():
        assert torch.equal(stoch(x), fresh(x))


def test_mean_mode_model_is_deterministic_and_differs_from_off():
    model = small_timm("vit_tiny_patch16_224")
    stochastify(model, low=0.2, high=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with sampling(model, "mean"):
            a, b = model(x), model(x)
        with sampling(model, "off"):
            c = model(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# -- create_model and the registered small ViTs ----------------------------------------------------


def test_conv_stem_tokens_see_a_4x4_window_and_the_patch2_model_is_unchanged():
    """Each token of the stem model reads its 2x2 patch plus a 1-pixel border (the 3x3 stem); vit_digits_patch2_8
    keeps its state-dict keys and 1-channel patch convolution, so committed runs still load."""
    from stochvit.models import ConvStemPatchEmbed

    stem = create_model("vit_digits_convstem_8", stochastic=False).eval()
    embed = stem.patch_embed
    assert isinstance(embed, ConvStemPatchEmbed) and embed.num_patches == 16 and embed.in_chans == 1
    assert isinstance(embed.stem[1], nn.BatchNorm2d) and embed.proj.in_channels == 32
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    embed(x)[0, 0].sum().backward()  # token 0: the top-left patch
    reads = x.grad[0, 0] != 0
    assert reads[:3, :3].all() and reads.sum() == 9  # rows/columns 0-2 (padding beyond the edge)
    x.grad = None
    embed(x)[0, 5].sum().backward()  # token 5: patch (1, 1), pixels 2-3, so rows/columns 1-4
    assert (x.grad[0, 0] != 0).nonzero().min(0).values.tolist() == [1, 1] and (x.grad[0, 0] != 0).sum() == 16
    bare = ConvStemPatchEmbed(stem_norm=False)
    assert isinstance(bare.stem[1], nn.Identity) and bare.stem[0].bias is not None
    plain = create_model("vit_digits_patch2_8", stochastic=False)
    assert type(plain.patch_embed) is timm.layers.PatchEmbed and plain.patch_embed.proj.in_channels == 1
    assert not any(k.startswith("patch_embed.stem") for k in plain.state_dict())
    assert set(stem.state_dict()) - set(plain.state_dict()) == {f"patch_embed.stem.{k}" for k in (
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")}


@pytest.mark.parametrize("name,shape", [("vit_digits_patch2_8", (2, 1, 8, 8)), ("vit_digits_convstem_8", (2, 1, 8, 8)),
                                        ("vit_tiny_patch4_32", (2, 3, 32, 32)), ("vit_small_patch4_32", (2, 3, 32, 32))])
def test_registered_small_vits(name, shape):
    assert name in timm.list_models(name)
    model = create_model(name, stochastic=True).eval()
    assert sum(isinstance(m, StochasticMlp) for m in model.modules()) == len(model.blocks)
    assert model(torch.rand(shape)).shape == (2, 10)
    plain = create_model(name, stochastic=False, num_classes=3)
    assert not any(isinstance(m, StochasticLinear) for m in plain.modules())
    assert plain(torch.rand(shape)).shape == (2, 3)


def test_create_model_settings_and_errors():
    model = create_model("vit_digits_patch2_8", stochastic=dict(kind="full", sharing="batch", blocks=[1]), act_layer="relu")
    mlps = [b.mlp for b in model.blocks]
    assert [isinstance(m, StochasticMlp) for m in mlps] == [False, True, False, False]
    assert mlps[1].stochastic.kind == "full" and mlps[1].stochastic.sharing == "batch"
    assert isinstance(mlps[1].act, nn.ReLU)
    with pytest.raises(ValueError, match="colour"):
        create_model("vit_digits_patch2_8", stochastic=dict(colour="red"))
    with pytest.raises(ValueError, match="position"):
        create_model("vit_digits_patch2_8", stochastic=dict(position="nowhere"))
    with pytest.raises(UserError, match="unknown"):
        create_model("no_such_model_xyz")
    with pytest.raises(UserError, match="download"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_gradients_reach_every_weight_of_a_stochastic_vit():
    model = create_model("vit_digits_patch2_8", stochastic=True).train()
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(b.mlp.fc1.weight.grad.abs().sum() > 0 for b in model.blocks)


# -- predict_proba ----------------------------------------------------------------------------------


def toy(sharing: str = "image") -> nn.Module:
    """A small stochastic classifier whose class probabilities vary a lot between passes."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), StochasticLinear(8, low=0.0, high=2.0, sharing=sharing), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(4)
    return model.eval()


def test_predict_proba_averages_stochastic_passes():
    model = toy()
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    passes = sample_probs(model, x, samples=7)
    assert passes.shape == (7, 5, 3)
    assert torch.allclose(passes.sum(-1), torch.ones(7, 5))
    assert (passes[1:] - passes[0]).abs().max() > 0.05, "passes must be independent draws"
    torch.manual_seed(3)
    probs = predict_proba(model, x, samples=7)
    assert torch.allclose(probs, passes.mean(0))
    # each pass is a genuine forward: the K=1 prediction is the softmax of one forward under the same RNG state
    torch.manual_seed(4)
    one = predict_proba(model, x, samples=1)
    torch.manual_seed(4)
    with torch.no_grad():
        assert torch.allclose(one, model(x).softmax(-1))


def test_batched_passes_equal_looped_passes_in_distribution():
    """Passes batched together (images repeated along the batch) vs one pass at a time (max_batch = B).

    With K = 600 passes the standard error of a mean probability is sd/sqrt(K); the difference of two
    independent means gets 5 * sqrt(2) standard errors, and a two-sample KS test compares whole distributions.
    """
    model = toy()
    x = torch.randn(3, 4)
    k = 600
    batched = sample_probs(model, x, samples=k, max_batch=10_000)
    looped = sample_probs(model, x, samples=k, max_batch=3)
    assert batched.shape == looped.shape == (k, 3, 3)
    sd = torch.maximum(batched.std(0), looped.std(0))
    assert sd.min() > 0.01, "the toy model must be noticeably random"
    assert ((batched.mean(0) - looped.mean(0)).abs() < 5 * math.sqrt(2) * sd / math.sqrt(k)).all()
    for i in range(3):
        assert stats.ks_2samp(batched[:, i, 0].numpy(), looped[:, i, 0].numpy()).pvalue > 1e-3


def test_batch_sharing_passes_are_still_independent():
    """A batch-shared draw would make repeated copies identical, so such passes must not be batched."""
    passes = sample_probs(toy("batch"), torch.randn(2, 4), samples=6)
    for i in range(1, 6):
        assert (passes[i] - passes[0]).abs().max() > 1e-3


def test_deterministic_models_get_one_pass():
    det = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(5, 4)
    assert sample_probs(det, x, samples=10).shape == (1, 5, 3)
    with torch.no_grad():
        assert torch.allclose(predict_proba(det, x, samples=10), det(x).softmax(-1))
    model = toy()
    with sampling(model, "off"):
        assert sample_probs(model, x, samples=10).shape[0] == 1
    with sampling(model, "mean"):
        assert sample_probs(model, x, samples=10).shape[0] == 1
    assert sample_probs(model, x, samples=10).shape[0] == 10
    with pytest.raises(ValueError, match="samples"):
        sample_probs(model, x, samples=0)


def test_in_place_scaling_gives_the_out_of_place_gradients():
    """StochasticMlp scales fc1's output in place; outputs and gradients match the out-of-place layer with the same draw."""
    mlp = StochasticMlp(16, hidden_features=32, out_features=8).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(1)
    mlp(x).square().sum().backward()
    grads = [x.grad.clone(), mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone()]
    x.grad = None
    mlp.zero_grad()
    torch.manual_seed(1)
    y = mlp.fc2(mlp.act(mlp.stochastic(mlp.fc1(x))))  # same draw, out of place
    y.square().sum().backward()
    for g, ref in zip(grads, [x.grad, mlp.fc1.weight.grad, mlp.fc2.weight.grad]):
        assert torch.allclose(g, ref, atol=1e-6)


def _mlp_run(mlp: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Output and gradients of one seeded forward/backward pass."""
    x = x.clone().requires_grad_(True)
    mlp.zero_grad()
    torch.manual_seed(seed)
    y = mlp(x)
    y.square().sum().backward()
    return [y.detach(), x.grad, mlp.fc1.weight.grad.clone(), mlp.fc2.weight.grad.clone()]


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_fused_scale_gives_the_eager_outputs_and_gradients(act):
    """set_fused compiles act(fc1(x) * s); with the same draws it computes what the eager layer computes."""
    model = create_model("vit_digits_patch2_8", stochastic=True, act_layer=act)
    mlp = model.blocks[0].mlp.train()
    for batch in (4, 3):  # a new batch size recompiles
        x = torch.randn(batch, 17, mlp.fc1.in_features)
        eager = _mlp_run(mlp, x, seed=batch)
        assert stochvit.set_fused(mlp) == 1 and mlp.fused
        fused = _mlp_run(mlp, x, seed=batch)
        stochvit.set_fused(mlp, False)
        for a, b in zip(fused, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(_mlp_run(mlp, x, seed=0)[0], _mlp_run(mlp, x, seed=1)[0])  # draws still differ per pass


def test_fused_scale_falls_back_to_eager_when_compilation_fails(monkeypatch):
    from stochvit import mlp as mlp_module

    def broken(h, s):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(mlp_module, "_COMPILED", {repr(nn.GELU()): broken})
    monkeypatch.setattr(mlp_module, "_EAGER_ONLY", [])
    mlp = StochasticMlp(16, hidden_features=32).train()
    x = torch.randn(3, 5, 16)
    eager = _mlp_run(mlp, x, seed=2)
    mlp_module.set_fused(mlp)
    with pytest.warns(UserWarning, match="could not be compiled"):
        fused = _mlp_run(mlp, x, seed=2)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b)
    assert mlp_module._EAGER_ONLY  # later calls skip compilation


# -- LayerConfig: the layer's one source of defaults and checks --------------------------------------------------

def test_layer_config_is_the_layers_defaults_and_keeps_the_stored_json_form():
    import inspect
    import json
    from pathlib import Path

    from stochvit.defaults import DEFAULT_LAYER, LayerConfig
    from stochvit.models import stochastic_config
    from stochvit.train import TrainConfig

    for cls in (stochvit.StochasticLinear, stochvit.StochasticMlp):
        params = inspect.signature(cls).parameters
        for name, value in DEFAULT_LAYER.to_dict().items():
            if name in params:
                assert params[name].default == value, (cls.__name__, name)
    assert TrainConfig().stochastic == stochastic_config(True) == DEFAULT_LAYER.to_dict()
    # every committed run's config.json "stochastic" dict reads back and writes out unchanged (old runs still load)
    stored = [json.loads(p.read_text())["stochastic"] for p in Path(__file__).parents[1].glob("benchmarks/**/config.json")]
    layers = [s for s in stored if s is not None]
    assert layers, "no committed stochastic run directories found"
    for s in layers:
        assert LayerConfig.from_dict(s).to_dict() == s == stochastic_config(s)
    assert LayerConfig.from_dict({"blocks": [0, 2]}).blocks == (0, 2)  # hashable; to_dict gives the list back
    assert LayerConfig(blocks=(0, 2)).to_dict()["blocks"] == [0, 2]


@pytest.mark.parametrize("settings,named", [
    (dict(kind="sparse"), "kind='sparse'"), (dict(kind="full", distribution="bernoulli"), "distribution='bernoulli'"),
    (dict(sharing="pixel"), "sharing='pixel'"), (dict(position="inside"), "position='inside'"),
    (dict(kind="full", sharing="token"), "sharing='token'"), (dict(low=2.0, high=1.0), "low=2.0 must not exceed"),
    (dict(low=float("nan")), "low=nan"), (dict(high=1e5), "high=100000.0"), (dict(low=True), "low=True"),
    (dict(distribution="bernoulli", low=-1.0, high=0.5), "positive mean"), (dict(blocks=[0, "1"]), "blocks="),
    (dict(colour="red"), "unknown settings"),
])
def test_layer_config_refuses_bad_settings_naming_them(settings, named):
    from stochvit.defaults import LayerConfig

    with pytest.raises(ValueError, match=re.escape(named)):
        LayerConfig.from_dict(settings)
    if "colour" not in settings and "blocks" not in settings and "position" not in settings:
        with pytest.raises(ValueError, match=re.escape(named)):  # the layer itself gives the same refusal
            stochvit.StochasticLinear(8, **settings)
