"""Published benchmarks: the study's frozen shift set, CIFAR-10-C's released files, evaluation on another folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stochvit.data import ImageSet, load_data
from stochvit.eval.corruptions import CORRUPTIONS, ORIGINAL_CORRUPTIONS, SEVERITIES
from stochvit.suites.study_runs import shift_set

REFERENCE = Path(__file__).parent / "data" / "study_shift_reference.npz"


def test_study_shift_set_keeps_the_original_eight_corruptions():
    """The CIFAR-10 study caches predictions on its shift set: widening the built-in kinds must not change it."""
    assert ORIGINAL_CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast",
                                    "brightness", "jpeg", "pixelate")
    assert CORRUPTIONS[:8] == ORIGINAL_CORRUPTIONS  # a kind's place seeds its noise: new kinds only at the end
    assert len(CORRUPTIONS) > 8
    # the very images: shift sets made before the wider set existed (digits, and colour images stored as input)
    ref = np.load(REFERENCE)
    digits = shift_set(load_data("digits").test, 80, seed=0)
    rgb = shift_set(ImageSet(torch.from_numpy(ref["rgb_input"]), torch.arange(40) % 10), 40, seed=0)
    for got, want in ((digits.images, ref["digits"]), (rgb.images, ref["rgb"])):
        diff = (got.int() - torch.from_numpy(want).int()).abs()
        # identical here; one grey level of float rounding allowed on other CPUs, on a few pixels at most
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (diff.max(), (diff > 0).float().mean())
    assert np.array_equal(digits.labels.numpy(), ref["digits_labels"])
    assert len(SEVERITIES) * len(ORIGINAL_CORRUPTIONS) == 40  # the 8 x 5 grid the study's docs name


# -- CIFAR-10-C's released files ----------------------------------------------------------------------------------

N = 4  # images per severity in the synthetic release (the real one has 10,000)


def make_release(root: Path, corruptions=("fog", "snow"), n: int = N) -> Path:
    """A folder in the released format: (5 n, 32, 32, 3) uint8 per corruption, severity-major, and labels.npy.
    Pixel values encode (corruption, severity, image), so a wrong slice or axis order shows."""
    root.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(corruptions):
        value = np.array([[10 * k + 40 * (s - 1) + i for i in range(n)] for s in SEVERITIES], dtype=np.uint8).reshape(-1)
        images = np.broadcast_to(value[:, None, None, None], (5 * n, 32, 32, 3)).copy()
        images[:, 0, 0, :] = [1, 2, 3]  # channel order
        np.save(root / f"{c}.npy", images)
    np.save(root / "labels.npy", np.tile(np.arange(n) % 10, 5).astype(np.int64))
    return root


def test_release_is_read_memory_mapped_per_corruption_and_severity(tmp_path):
    from stochvit.eval.cifar_c import STANDARD, _load, open_benchmark

    bench = open_benchmark(f"cifar10c:{make_release(tmp_path / 'c10c')}")
    assert bench.title == "CIFAR-10-C" and bench.num_classes == 10 and bench.per_severity == N
    assert isinstance(_load(tmp_path / "c10c" / "fog.npy", "fog"), np.memmap)
    assert bench.available() == ["snow", "fog"] and bench.resolve(None) == STANDARD  # standard order; default: all 15
    for k, c in enumerate(("fog", "snow")):
        for s in SEVERITIES:
            cell = bench.cell(c, s)
            assert cell.images.shape == (N, 3, 32, 32) and cell.images.dtype == torch.uint8
            assert cell.images[:, 0, 1, 1].tolist() == [10 * k + 40 * (s - 1) + i for i in range(N)]
            assert cell.images[0, :, 0, 0].tolist() == [1, 2, 3]  # HWC -> CHW
            assert cell.labels.tolist() == list(range(N))
    part = bench.cell("snow", 5, np.array([1, 3]))
    assert part.images[:, 0, 1, 1].tolist() == [10 + 160 + 1, 10 + 160 + 3] and part.labels.tolist() == [1, 3]


def test_release_errors_are_one_clear_line(tmp_path):
    from stochvit.errors import UserError
    from stochvit.eval.cifar_c import open_benchmark

    def fails(spec, *fragments, check=None):
        with pytest.raises(UserError) as e:
            bench = open_benchmark(spec)
            if check:
                bench.check(*check)
        for f in fragments:
            assert f in str(e.value), (f, str(e.value))

    ok = (("fog",), SEVERITIES, 32, 3, 10)
    fails(f"cifar10:{tmp_path}", "expected cifar10c:PATH or cifar100c:PATH")
    fails(f"cifar10c:{tmp_path / 'nowhere'}", "does not exist")
    root = make_release(tmp_path / "r")
    (root / "labels.npy").unlink()
    fails(f"cifar10c:{root}", "labels.npy: no such file")
    np.save(root / "labels.npy", np.zeros(7, dtype=np.int64))
    fails(f"cifar10c:{root}", "integer labels of 5 severity blocks")
    np.save(root / "labels.npy", np.arange(5 * N) % 10)
    fails(f"cifar10c:{root}", "do not hold the same labels")
    (root / "labels.npy").write_text("not an array")
    fails(f"cifar10c:{root}", "not a readable .npy array")
    np.save(root / "labels.npy", np.tile(np.arange(N) + 8, 5))
    fails(f"cifar10c:{root}", "outside 0..9")
    fails(f"cifar100c:{root}", "100 classes but the model has 10", check=ok)  # labels 8..11 fit CIFAR-100
    root = make_release(tmp_path / "ok")
    fails(f"cifar10c:{root}", "missing frost.npy", "present: snow, fog", check=(("fog", "frost"),) + ok[1:])
    fails(f"cifar10c:{root}", "32x32 colour images but the model takes 1x8x8", check=ok[:2] + (8, 1, 10))
    np.save(root / "fog.npy", np.zeros((5 * N - 1, 32, 32, 3), dtype=np.uint8))
    fails(f"cifar10c:{root}", "fog.npy: shape (19, 32, 32, 3)", "expected (20, 32, 32, 3) uint8", check=ok)
    np.save(root / "fog.npy", np.zeros((5 * N, 32, 32, 3), dtype=np.float32))
    fails(f"cifar10c:{root}", "float32, expected", check=ok)
    with pytest.raises(UserError, match="has no corruption 'fogg'"):
        open_benchmark(f"cifar10c:{root}").resolve(("fogg",))


def rgb_folder_run(root: Path) -> Path:
    """A deterministic 32x32 colour run on a tiny folder with train/val/test (seconds): CIFAR-10-C's image format."""
    from torchvision.io import encode_png, write_file

    from stochvit.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    for part, count in (("train", 3), ("val", 1), ("test", 1)):
        for c in range(10):
            (root / "data" / part / f"class{c}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
                write_file(str(root / "data" / part / f"class{c}" / f"{i}.png"), encode_png(img))
    cfg = TrainConfig(data=f"imagefolder:{root / 'data'}", model="vit_tiny_patch4_32", epochs=1, warmup_epochs=0,
                      batch_size=30, eval_samples=1, stochastic=None)
    return train(cfg, out=root / "run", quiet=True)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory) -> Path:
    return rgb_folder_run(tmp_path_factory.mktemp("rgb"))


def test_calibration_shift_on_the_released_files(rgb_run, tmp_path, capsys):
    import json

    from stochvit.cli import main
    from stochvit.eval.cifar_c import open_benchmark
    from stochvit.predict import dataset_probs
    from stochvit.runs import load_run
    from stochvit.suites import calibration

    run = rgb_run
    release = make_release(tmp_path / "CIFAR-10-C")
    out = calibration.run(calibration.Settings([run], samples=1, shift=f"cifar10c:{release}", corruptions=("fog", "snow"),
                                               severities=(1, 5), out=tmp_path / "rep", quiet=True, n_boot=100)).out
    report = json.loads((out / "calibration.json").read_text())
    src = report["shift_source"]
    assert src["kind"] == "cifar10c" and "official test set" in src["images"] and "compare directly" in src["corruptions"]
    assert "the run's own clean test split" in src["clean"] and report["shift_images"] == N
    assert report["corruptions"] == ["fog", "snow"] and report["images"] == 10
    # each cell's metrics are those of the model's predictions on exactly that cell's images
    bench, model = open_benchmark(f"cifar10c:{release}"), load_run(run).model
    e = report["methods"]["run"]
    for c in ("fog", "snow"):
        for s in (1, 5):
            probs, labels = dataset_probs(model, bench.cell(c, s), 1)
            acc = (probs.mean(0).argmax(1) == labels).float().mean().item()
            assert e["shift"][c][str(s)]["mc_average"]["accuracy"] == pytest.approx(acc, abs=1e-6)
    # severity 0 under a benchmark is the run's own clean test split (CIFAR-10-C ships no clean copies)
    assert e["shift_mean"]["0"]["mc_average"]["accuracy"] == pytest.approx(e["test"]["mc_average"]["accuracy"], abs=1e-6)
    md = (out / "calibration.md").read_text()
    assert "Corrupted images: 4 of the 4 images per cell of CIFAR-10-C (the official test set)" in md
    assert f"Test images: the 10 images of {run.parent / 'data' / 'test'}" in md

    assert main(["calibration", str(run), "--shift", f"cifar10c:{release}", "--corruptions", "fog", "--severities", "2",
                 "--n-boot", "100", "--samples", "1", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "calibration.json").read_text())["corruptions"] == ["fog"]
    capsys.readouterr()
    assert main(["calibration", str(run), "--shift", f"cifar10c:{release}", "--out", str(tmp_path / "bad")]) == 2
    assert "missing gaussian_noise.npy" in capsys.readouterr().err  # the default is all 15 standard kinds
    assert not (tmp_path / "bad").exists()


# -- evaluating a run on another labelled folder (e.g. the official test set) --------------------------------------

def write_folder(root: Path, classes: list[str], per_class: int, seed: int = 1) -> Path:
    from torchvision.io import encode_png, write_file

    g = torch.Generator().manual_seed(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            write_file(str(root / c / f"{i}.png"), encode_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)))
    return root


def test_evaluate_on_every_image_of_another_folder_with_the_runs_classes(rgb_run, tmp_path, capsys):
    import json

    from torchvision.io import read_image

    from stochvit.cli import main
    from stochvit.runs import load_run

    classes = [f"class{c}" for c in range(10)]
    ext = write_folder(tmp_path / "official-test", classes, 10)
    assert main(["evaluate", str(rgb_run), "--data", f"imagefolder:{ext}", "--split", "all", "--samples", "1"]) == 0
    result = json.loads(next(rgb_run.glob("eval-imagefolder_*-all-on-k1-seed0.json")).read_text())
    assert result["split"] == "all" and result["images"] == f"every image of imagefolder:{ext} (100)"
    assert f"every image of imagefolder:{ext} (100)" in capsys.readouterr().out
    # the same accuracy and NLL from the PNG files decoded here, labelled by their folder names
    files = sorted(ext.glob("*/*.png"))
    x = torch.stack([read_image(str(f)) for f in files]).float() / 255
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    model = load_run(rgb_run).model.eval()
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert result["mc_average"]["accuracy"] == pytest.approx((probs.argmax(1) == y).float().mean().item(), abs=1e-6)
    assert result["mc_average"]["nll"] == pytest.approx(-probs[torch.arange(100), y].log().mean().item(), rel=1e-4)

    # another folder's classes are refused, never silently relabelled; --split all needs other data
    other = write_folder(tmp_path / "other", [f"kind{c}" for c in range(10)], 10)
    assert main(["evaluate", str(rgb_run), "--data", f"imagefolder:{other}", "--split", "all"]) == 2
    assert "but the run was trained on class0, class1" in capsys.readouterr().err
    assert main(["evaluate", str(rgb_run), "--split", "all"]) == 2
    assert "every image of another dataset" in capsys.readouterr().err
