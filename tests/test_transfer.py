"""Transfer learning: weight loading and adaptation (timm helpers), stochastic modes, linear probe, bad files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from stochvit.cli import main
from stochvit.data import load_data
from stochvit.errors import UserError
from stochvit.eval.transfer import adapt_state_dict, prepare, read_weights
from stochvit.layers import StochasticLinear
from stochvit.mlp import StochasticMlp
from stochvit.models import create_model
from stochvit.runs import build_model, load_run, read_json
from stochvit.train import TrainConfig, param_groups

TASK = "digits:classes=5-9"


def _prepared(tmp_path: Path, name: str, **kwargs) -> tuple[dict, torch.nn.Module]:
    """Prepare (no training) a transfer run; return its config and the model it describes, with the init weights."""
    path = prepare(out=tmp_path / name, data=TASK, **kwargs)
    config = read_json(path / "config.json", "config")
    model = build_model(config)
    model.net.load_state_dict(load_file(str(path / "init.safetensors")))
    return config, model


def _stochastic_layers(model: torch.nn.Module) -> list[StochasticLinear]:
    return [m for m in model.modules() if isinstance(m, StochasticLinear)]


def test_class_subset_spec_keeps_parent_split() -> None:
    parent, sub = load_data("digits"), load_data(TASK, train_limit=50)
    mask = parent.test.labels >= 5
    assert sub.class_names == ["5", "6", "7", "8", "9"] and len(sub.train) == 50
    assert torch.equal(sub.test.images, parent.test.images[mask]) and torch.equal(sub.test.labels, parent.test.labels[mask] - 5)
    with pytest.raises(UserError, match="classes"):
        load_data("digits:classes=7-12")


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_state_dict_from_local_file_into_stochastic_model(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("vit_digits_patch2_8", num_classes=10)
    state = source.state_dict()
    path = tmp_path / f"w.{suffix}"
    save_file(state, str(path)) if suffix == "safetensors" else torch.save({"state_dict": state, "epoch": 3}, path)
    assert read_weights(path).keys() == state.keys()
    config, model = _prepared(tmp_path, "run", source="vit_digits_patch2_8", weights=str(path), stochastic="add")
    assert config["transfer"]["source"]["kind"] == "timm" and len(config["transfer"]["source"]["sha256"]) == 64
    assert sum(isinstance(m, StochasticMlp) for m in model.modules()) == 4
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("head."))
    assert loaded["head.weight"].shape == (5, 64)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 5)


def test_head_replaced_pos_embed_resampled_and_channels_adapted() -> None:
    src = timm.create_model("vit_tiny_patch16_224", depth=2)  # 14x14 grid, 3 channels, 1000 classes (2 blocks: fast)
    target = create_model("vit_tiny_patch16_224", stochastic=True, depth=2, img_size=64, in_chans=1, num_classes=5)  # 4x4
    state, notes = adapt_state_dict(src.state_dict(), target)
    assert state["pos_embed"].shape == (1, 1 + 16, 192)
    assert torch.equal(state["pos_embed"][:, :1], src.pos_embed[:, :1])  # the class token's embedding is not resampled
    assert state["patch_embed.proj.weight"].shape == (192, 1, 16, 16)
    assert torch.allclose(state["patch_embed.proj.weight"], src.patch_embed.proj.weight.sum(1, keepdim=True))
    assert state["head.weight"].shape == (5, 192) and state["head.bias"].shape == (5,)
    assert any("position embeddings resampled" in n for n in notes) and any("input channels" in n for n in notes)
    target.load_state_dict(state)
    assert target(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_a_conv_stem_adapts_its_stem_conv_to_other_channels() -> None:
    """The stem model's first convolution is the stem's (3x3), not the patch projection that reads its 32 channels."""
    src = create_model("vit_digits_convstem_8", stochastic=False, in_chans=3)
    target = create_model("vit_digits_convstem_8", stochastic=False, num_classes=5)  # 1 channel
    state, notes = adapt_state_dict(src.state_dict(), target)
    assert any("input channels adapted 3 -> 1 (patch_embed.stem.0.weight)" in n for n in notes)
    assert torch.allclose(state["patch_embed.stem.0.weight"], src.patch_embed.stem[0].weight.sum(1, keepdim=True))
    assert torch.equal(state["patch_embed.proj.weight"], src.patch_embed.proj.weight)
    target.load_state_dict(state)


def test_timm_source_on_digits_resizes_and_uses_target_normalisation(tmp_path: Path) -> None:
    src = timm.create_model("vit_tiny_patch4_32")  # 32px, 8x8 grid, RGB
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    config, model = _prepared(tmp_path, "run", source="vit_tiny_patch4_32", weights=str(tmp_path / "w.safetensors"))
    assert config["model"]["kwargs"]["img_size"] == 8 and config["model"]["kwargs"]["in_chans"] == 1
    assert model.net.pos_embed.shape == (1, 1 + 4, 192) and model.net.patch_embed.proj.weight.shape[1] == 1
    assert config["transfer"]["normalisation"] == "target data"  # RGB statistics do not apply to 1 channel
    assert not _stochastic_layers(model)  # keep on a deterministic source: deterministic


def test_keep_off_add(tmp_path: Path, digits_runs: dict[str, Path]) -> None:
    stoch, det = str(digits_runs["stochastic"]), str(digits_runs["deterministic"])
    source_net = load_run(stoch).model.net
    x = torch.rand(4, 1, 8, 8)

    config, kept = _prepared(tmp_path, "keep", source=stoch, stochastic="keep")
    layers = _stochastic_layers(kept)
    assert len(layers) == 4 and all(m.mode == "on" and m.sharing == "image" for m in layers)
    assert config["stochastic"] == read_json(Path(stoch) / "config.json", "c")["stochastic"]
    assert not torch.equal(kept.eval()(x), kept(x))  # still random at inference
    assert config["transfer"]["normalisation"] == "source"

    _, off = _prepared(tmp_path, "off", source=stoch, stochastic="off")
    assert not _stochastic_layers(off) and not any(isinstance(m, StochasticMlp) for m in off.modules())
    assert torch.equal(off.eval()(x), off(x))
    own = off.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in source_net.state_dict().items() if not k.startswith("head."))

    layer = dict(kind="full", distribution="orthogonal", sharing="image", position="post_act", blocks=[0, 1])
    config, added = _prepared(tmp_path, "add", source=det, stochastic="add", layer=layer)
    layers = _stochastic_layers(added)
    assert len(layers) == 2 and all(m.kind == "full" and m.distribution == "orthogonal" for m in layers)
    assert [b.mlp.position for b in added.net.blocks[:2]] == ["post_act"] * 2
    assert not isinstance(added.net.blocks[2].mlp, StochasticMlp)
    assert config["stochastic"]["blocks"] == [0, 1]

    _, kept_det = _prepared(tmp_path, "keep-det", source=det, stochastic="keep")
    assert not _stochastic_layers(kept_det)
    with pytest.raises(UserError, match="already stochastic"):
        prepare(stoch, tmp_path / "bad", data=TASK, stochastic="add")


def test_backbone_lr_scale_and_freezeparam_groups() -> None:
    model = build_model(dict(model=dict(name="vit_digits_patch2_8", kwargs=dict(num_classes=5)), stochastic=None,
                             data=dict(mean=[0.0], std=[1.0])))
    head = {id(p) for p in model.net.head.parameters()}
    groups = param_groups(model, TrainConfig(lr=1e-3, backbone_lr_scale=0.1))
    assert {g["lr"] for g in groups if {id(p) for p in g["params"]} <= head} == {1e-3}
    assert {g["lr"] for g in groups if not {id(p) for p in g["params"]} & head} == {1e-3 * 0.1}
    groups = param_groups(model, TrainConfig(lr=1e-3, freeze_backbone=True))
    assert {id(p) for g in groups for p in g["params"]} == head
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["net.head.weight", "net.head.bias"]
    assert len(param_groups(build_model(dict(model=dict(name="vit_digits_patch2_8", kwargs={}), stochastic=None,
                                              data=dict(mean=[0.0], std=[1.0]))), TrainConfig())) == 2  # unchanged default


def test_bad_weights_give_clear_errors(tmp_path: Path) -> None:
    def fails(weights: Path, match: str, source: str = "vit_digits_patch2_8") -> None:
        with pytest.raises(UserError, match=match):
            prepare(source, tmp_path / "out", data=TASK, weights=str(weights))
        assert not (tmp_path / "out").exists()

    save_file(timm.create_model("vit_tiny_patch4_32").state_dict(), str(tmp_path / "other.safetensors"))
    fails(tmp_path / "other.safetensors", "do not fit")  # a wider ViT
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, tmp_path / "cnn.pth")
    fails(tmp_path / "cnn.pth", "do not fit.*missing")  # not a ViT at all
    save_file({"pos_embed": torch.zeros(1, 197, 192)}, str(tmp_path / "p16.safetensors"))  # checked before the weights
    fails(tmp_path / "p16.safetensors", "smaller than .* 16-pixel patches", source="vit_tiny_patch16_224")  # 8px digits
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    fails(tmp_path / "junk.safetensors", "cannot read weights")
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("vit_digits_patch2_8").state_dict(), good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails(tmp_path / "truncated.pth", "cannot read weights")

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"pos_embed": Payload()}, tmp_path / "evil.pth")
    fails(tmp_path / "evil.pth", "could run code")
    assert not marker.exists()

    with pytest.raises(UserError, match="weights=PATH"):
        prepare("vit_tiny_patch16_224", tmp_path / "out", data=TASK)
    with pytest.raises(UserError, match="neither a run directory nor a timm model"):
        prepare("no_such_model_xyz", tmp_path / "out", data=TASK, weights=str(good))


@pytest.mark.slow
def test_cli_linear_probe_end_to_end(tmp_path: Path, digits_runs: dict[str, Path], capsys) -> None:
    src, out = digits_runs["stochastic"], tmp_path / "probe"
    args = ["transfer", "--from", str(src), "--data", TASK, "--mode", "linear-probe", "--epochs", "1", "--train-limit", "100",
            "--eval-samples", "2", "--out", str(out)]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    after, before = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    backbone = [k for k in before if not k.startswith("head.")]
    assert backbone and all(torch.equal(after[k], before[k]) for k in backbone)  # frozen: bit-identical
    init = load_file(str(out / "init.safetensors"))
    assert after["head.weight"].shape == (5, 64) and not torch.equal(after["head.weight"], init["head.weight"])
    run = load_run(out)
    assert run.config["transfer"]["mode"] == "linear-probe" and len(_stochastic_layers(run.model)) == 4
    assert (out / "transfer.md").exists() and (out / "curves.png").exists()
    assert main(["evaluate", str(out), "--samples", "2"]) == 0
    result = json.loads(next(out.glob("eval-*.json")).read_text())
    assert result["data"] == TASK and 0 <= result["mc_average"]["accuracy"] <= 1
    assert main(args) == 2  # the directory now exists: refused, not overwritten
    assert "not empty" in capsys.readouterr().err
    assert main(["transfer", "--from", str(src), "--weights", str(out / "init.safetensors"), "--out", str(tmp_path / "x")]) == 2
