"""Ecosystem (issue 18): packaging metadata, runs that plain timm loads, timm's mlp_layer hook, CSV metrics, model cards."""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import stochvit
from stochvit.cli import main
from stochvit.runs import Curves, load_run
from stochvit.train import TrainConfig, train, warn_long_warmup

ROOT = Path(__file__).resolve().parents[1]


def _python_prints_ok(code: str) -> None:
    """Run `code` in a fresh interpreter (nothing of this process imported) and expect it to print "ok"."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_packaging_license_py_typed_single_version_and_bounds():
    assert "MIT License" in (ROOT / "LICENSE").read_text() and "stochvit developers" in (ROOT / "LICENSE").read_text()
    assert (Path(stochvit.__file__).parent / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    # one source for the version: pyproject reads stochvit.__version__, the installed metadata agrees with it
    assert "version" not in meta and meta["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "stochvit.__version__"}
    assert importlib.metadata.version("stochvit") == stochvit.__version__
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["stochvit"]
    deps = {d.split(">")[0].split("<")[0].split("=")[0]: d for d in meta["dependencies"]}
    assert "<" not in deps["torch"] and "<" not in deps["torchvision"], "no upper caps on torch/torchvision"
    assert deps["timm"].replace(" ", "").endswith(",<2")
    assert meta["requires-python"] == ">=3.11"  # flwr 1.42 needs 3.11
    assert any(d.startswith("tomli_w") for d in meta["optional-dependencies"]["federated"])  # suites/federated.py imports it


def _tracked(under: str) -> list[str]:
    """The repository's tracked files under `under` (what a clean checkout, hence a CI build, holds)."""
    try:
        out = subprocess.run(["git", "ls-files", under], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no source tree to build a wheel from")
    return out.split()


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs_from_there(tmp_path: Path):
    """A wheel built from a clean copy of the repo holds every package file (the Flower app's manifest, py.typed), installs
    in a new venv with its dependencies resolved from the site-packages already there (no index), and its console script
    runs by full path, unactivated, importing the installed package, not the source tree."""
    src = tmp_path / "src"
    for name in ["pyproject.toml", "README.md", "LICENSE", *_tracked("stochvit")]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the source tree
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("stochvit-*.whl")
    assert wheel.name == f"stochvit-{stochvit.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        packaged = {n for n in z.namelist() if n.startswith("stochvit/")}
    assert packaged == set(_tracked("stochvit")), "the wheel holds exactly the package's tracked files"
    assert {"stochvit/py.typed", "stochvit/federated/app/pyproject.toml"} <= packaged

    # --without-pip: the venv's own bundled setuptools would shadow the newer one torch requires; the outer pip installs
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True, env=env)
    python, script = venv / "bin" / "python", venv / "bin" / "stochvit"
    subprocess.run([*pip, "--python", str(python), "install", "--no-index", "-q", str(wheel)], check=True, env=env,
                   cwd=tmp_path, capture_output=True)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    def run(*argv: str) -> str:
        done = subprocess.run([str(script), *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("--version").strip() == f"stochvit {stochvit.__version__}"
    assert run("demo", "--help").startswith("usage: stochvit demo")
    installed = subprocess.run([str(python), "-c", "import stochvit; print(stochvit.__file__)"], env=env, cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    assert Path(installed).is_relative_to(venv) and not Path(installed).is_relative_to(ROOT)
    app = Path(run("federated", "--print-app-path").strip())
    assert app.is_relative_to(venv) and (app / "pyproject.toml").is_file()
    assert (app / "pyproject.toml").read_bytes() == (ROOT / "stochvit/federated/app/pyproject.toml").read_bytes()


def test_print_app_path_needs_neither_out_nor_flower(monkeypatch, capsys):
    """`flwr run "$(stochvit federated --print-app-path)" CONN`: the installed app directory, printed before the
    required --out is checked and without importing Flower (the federated extra may be missing)."""
    for name in ("flwr", "tomli_w"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    with pytest.raises(SystemExit) as done:
        main(["federated", "--print-app-path"])
    assert done.value.code == 0
    app = Path(capsys.readouterr().out.strip())
    assert app == Path(stochvit.__file__).resolve().parent / "federated" / "app"
    manifest = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert manifest == {"serverapp": "stochvit.federated.server_app:app", "clientapp": "stochvit.federated.client_app:app"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-epoch stochastic digits run (seconds) of the plain patch-2 ViT, the run directory every loader below
    reads (the recipe's conv-stem model needs `import stochvit` in timm: `stem_run`)."""
    cfg = TrainConfig(epochs=1, train_limit=200, batch_size=50, eval_samples=2, warmup_epochs=0, model="vit_digits_patch2_8")
    return train(cfg, out=tmp_path_factory.mktemp("eco") / "run", quiet=True)


@pytest.fixture(scope="module")
def stem_run(tmp_path_factory) -> Path:
    """A one-epoch deterministic run of the digits recipe's conv-stem model."""
    cfg = TrainConfig(epochs=1, train_limit=200, batch_size=50, eval_samples=1, warmup_epochs=0, stochastic=None,
                      model="vit_digits_convstem_8")
    return train(cfg, out=tmp_path_factory.mktemp("eco") / "stem", quiet=True)


def test_a_conv_stem_run_loads_in_timm_after_import_stochvit_and_says_so(stem_run: Path, tmp_path: Path):
    """timm's model_args cannot carry the stem, so config.json names the registered model; timm alone refuses the
    name, timm after `import stochvit` rebuilds the run, and the model card tells the user."""
    config = json.loads((stem_run / "config.json").read_text())
    assert config["architecture"] == "vit_digits_convstem_8" and config["pretrained_cfg"]["first_conv"] == "patch_embed.stem.0"
    assert "after `import stochvit`" in (stem_run / "README.md").read_text()
    x, normalised = _normalised(config)
    torch.save(dict(x=normalised, y=stochvit.load_model(stem_run)(x)), tmp_path / "xy.pt")
    code = f"""
import sys, timm, torch
run = {str(stem_run)!r}
try:
    timm.create_model("local-dir:" + run, pretrained=True)
    raise SystemExit("timm alone built the stem model")
except RuntimeError as e:
    assert "Unknown model" in str(e), e
import stochvit
xy = torch.load({str(tmp_path / "xy.pt")!r})
a = timm.create_model("local-dir:" + run, pretrained=True).eval()
b = timm.create_model("vit_digits_convstem_8", pretrained=True, pretrained_cfg_overlay=dict(file=run + "/model.safetensors"),
                      in_chans=1, img_size=8).eval()
for m in (a, b):
    assert torch.allclose(m(xy["x"]), xy["y"], atol=1e-5)
print("ok")
"""
    _python_prints_ok(code)


def _normalised(config: dict, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images and the same images normalised by the run's pretrained_cfg, as a timm user's transform would."""
    pcfg = config["pretrained_cfg"]
    x = torch.rand(n, *pcfg["input_size"], generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(pcfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    return x, (x - mean) / std


def test_load_model_is_the_runs_model_in_eval_mode(tiny_run: Path):
    model = stochvit.load_model(tiny_run)
    assert isinstance(model, stochvit.Normalized) and not model.training
    reference = load_run(tiny_run).model.net.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.net.state_dict().items())
    assert sum(isinstance(m, stochvit.StochasticMlp) for m in model.modules()) == 4


def test_run_config_carries_timms_pretrained_cfg(tiny_run: Path):
    config = json.loads((tiny_run / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    assert pcfg["input_size"] == [1, 8, 8] and pcfg["num_classes"] == config["num_classes"] == 10
    assert pcfg["mean"] == config["data"]["mean"] and pcfg["std"] == config["data"]["std"]
    assert pcfg["label_names"] == config["data"]["class_names"]
    assert config["architecture"] == pcfg["architecture"] and config["model_args"]["depth"] == 4


def test_plain_timm_create_model_and_load_state_dict_reproduce_the_run(tiny_run: Path):
    """What the README tells a timm user: the registered name, the pretrained_cfg's shape, safetensors' loader."""
    config = json.loads((tiny_run / "config.json").read_text())
    pcfg = config["pretrained_cfg"]
    net = timm.create_model(config["model"]["name"], num_classes=pcfg["num_classes"], img_size=pcfg["input_size"][-1],
                            in_chans=pcfg["input_size"][0])
    net.load_state_dict(safetensors.torch.load_file(str(tiny_run / "model.safetensors")))
    x, normalised = _normalised(config)
    model = stochvit.load_model(tiny_run)
    with stochvit.sampling(model, "mean"):  # the layer's scale at its mean (1): the deterministic network timm builds
        expected = model(x)
    assert torch.allclose(net.eval()(normalised), expected, atol=1e-5)


def test_timm_without_stochvit_loads_the_run_directory(tiny_run: Path):
    """A user with timm alone: `local-dir:RUN_DIR`, and architecture + model_args from config.json."""
    config = json.loads((tiny_run / "config.json").read_text())
    x, normalised = _normalised(config)
    model = stochvit.load_model(tiny_run)
    with stochvit.sampling(model, "mean"):
        torch.save(dict(x=normalised, y=model(x)), tiny_run.parent / "xy.pt")
    code = f"""
import json, sys, safetensors.torch, timm, torch
run = {str(tiny_run)!r}
xy = torch.load({str(tiny_run.parent / "xy.pt")!r})
a = timm.create_model("local-dir:" + run, pretrained=True).eval()
c = json.load(open(run + "/config.json"))
b = timm.create_model(c["architecture"], **c["model_args"]).eval()
b.load_state_dict(safetensors.torch.load_file(run + "/model.safetensors"))
cfg = timm.data.resolve_data_config(model=a)
assert "stochvit" not in sys.modules
assert cfg["input_size"] == (1, 8, 8) and list(cfg["mean"]) == c["data"]["mean"], cfg
for m in (a, b):
    assert torch.allclose(m(xy["x"]), xy["y"], atol=1e-5)
print("ok")
"""
    _python_prints_ok(code)


def test_pretrained_cfg_overlay_file_loads_local_weights(tiny_run: Path, tmp_path: Path):
    """The hint in create_model's error works for stochvit's registered ViTs and for timm's own."""
    weights = tiny_run / "model.safetensors"
    kwargs = json.loads((tiny_run / "config.json").read_text())["model"]["kwargs"]
    state = safetensors.torch.load_file(str(weights))
    for model in (stochvit.create_model("vit_digits_patch2_8", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                        **kwargs),
                  timm.create_model("vit_digits_patch2_8", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                    **kwargs)):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, stochvit.StochasticMlp) for m in model.modules()) == 0
    with pytest.raises(stochvit.UserError, match="no published weights"):
        timm.create_model("vit_digits_patch2_8", pretrained=True)
    other = timm.create_model("vit_tiny_patch16_224", depth=1)
    safetensors.torch.save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = stochvit.create_model("vit_tiny_patch16_224", depth=1, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    assert torch.equal(loaded.state_dict()["head.weight"], other.state_dict()["head.weight"])


@pytest.mark.parametrize("name, kwargs, shape", [("vit_digits_patch2_8", {}, (1, 8, 8)),
                                                 ("vit_tiny_patch16_224", dict(depth=2, img_size=32), (3, 32, 32))])
def test_timms_mlp_layer_hook_builds_token_consistent_stochastic_mlps(name: str, kwargs: dict, shape: tuple[int, ...]):
    """timm's own hook for new models: mlp_layer=partial(StochasticMlp, ...), beside stochastify for built ones."""
    model = timm.create_model(name, mlp_layer=functools.partial(stochvit.StochasticMlp, low=0.25, high=1.75), **kwargs).eval()
    mlps = [m for m in model.modules() if isinstance(m, stochvit.StochasticMlp)]
    assert len(mlps) == len(model.blocks) and all(m.stochastic.low == 0.25 and m.stochastic.sharing == "image" for m in mlps)
    assert model.state_dict().keys() == timm.create_model(name, **kwargs).state_dict().keys()  # plain checkpoints load
    seen: dict[str, torch.Tensor] = {}
    first = mlps[0]
    first.fc1.register_forward_hook(lambda m, i, out: seen.__setitem__("h", out.detach().clone()))
    first.act.register_forward_pre_hook(lambda m, i: seen.__setitem__("scaled", i[0].detach().clone()))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y1 = model(x)
    scale = seen["scaled"] / seen["h"]  # (images, tokens, hidden): the draw each token got
    assert torch.allclose(scale, scale[:, :1].expand_as(scale), rtol=1e-4, atol=1e-5), "tokens of an image share a draw"
    assert not torch.allclose(scale[0, 0], scale[1, 0]), "images draw independently"
    assert 0.25 <= scale.min() and scale.max() <= 1.75
    with torch.no_grad():
        assert not torch.allclose(model(x), y1)  # random at inference too


def test_metrics_csv_mirrors_metrics_jsonl(tiny_run: Path, tmp_path: Path):
    """Same rows as metrics.jsonl, a header of every key seen; a resumed epoch replaces its row in both files."""
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    with open(tiny_run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 1 and list(table[0]) == list(rows[0])
    assert all(math.isclose(float(table[0][k]), v) for k, v in rows[0].items())

    curves = Curves(tmp_path)
    curves.append(dict(epoch=0, train_loss=1.0))  # --val-every 2: no validation keys yet
    curves.append(dict(epoch=1, train_loss=0.5, val_nll=0.7, errors=["node 3 timed out"]))
    curves.append(dict(epoch=1, train_loss=0.4, val_nll=0.6, errors=[]))  # the resumed epoch 1 again
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,train_loss,val_nll,errors", "0,1.0,,", "1,0.4,0.6,[]"]
    assert [r["epoch"] for r in curves.rows()] == [0, 1]


def test_model_card_has_settings_data_metrics_command_commit_and_device(tiny_run: Path):
    card = (tiny_run / "README.md").read_text()
    config = json.loads((tiny_run / "config.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: timm\n") and "# Model card for run" in card  # Hugging Face front matter
    assert "vit_digits_patch2_8" in card and "sharing=image" in card and "| batch_size | `50` |" in card  # settings
    assert "**Dataset:** `digits`" in card and '"train_limit": 200' in card and '"test": 180' in card  # data and split
    acc = summary["test"]["single_pass"]["accuracy"]
    assert f"| accuracy | {acc['mean']:.4f} ± {acc['std']:.4f} |" in card  # the test metrics
    prov = summary["provenance"]
    assert prov["command"] == shlex.join(sys.argv) and f"`{prov['command']}`" in card
    if Path(stochvit.__file__).resolve().parents[1] == ROOT and (ROOT / ".git").exists():  # a source checkout
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", prov["git_commit"]) and prov["git_commit"] in card
    assert prov["device"].startswith(("cpu (", "cuda (")) and prov["device"] in card
    assert config["versions"]["torch"] in card and 'stochvit.load_model("path/to/run")' in card


def test_run_files_share_one_permission_mode(tiny_run: Path):
    """model.safetensors used to be 0600 (safetensors' save_file) beside 0644 files; all follow the umask now."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_run.iterdir() if p.is_file()}
    assert {"model.safetensors", "README.md", "metrics.csv", "checkpoint.pt", "summary.json"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_warmup_longer_than_the_run_warns_in_one_line(tmp_path: Path, capsys):
    # twice the recipe's batch of 32: its lr 3e-3/sqrt(2) scales back to 3e-3 (stochvit.scale.scaled_lr)
    args = ["train", "--epochs", "1", "--train-limit", "100", "--batch-size", "64", "--eval-samples", "1"]
    assert main([*args, "--out", str(tmp_path / "long")]) == 0  # the default --warmup-epochs 2
    warned = [line for line in capsys.readouterr().err.splitlines() if "warmup" in line]
    assert warned == ["stochvit: warning: --warmup-epochs 2 is longer than the run (--epochs 1): the learning rate peaks "
                      "at 50% of --lr 0.003 and never decays; pass a --warmup-epochs below 1"]
    assert warn_long_warmup(TrainConfig(epochs=1, warmup_epochs=0.5)) is None
    assert warn_long_warmup(TrainConfig(epochs=3, warmup_epochs=3)) is None
    assert "warmup" not in capsys.readouterr().err
