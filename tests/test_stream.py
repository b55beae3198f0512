"""Streamed image folders: the in-memory split and pixels, `auto` at the budget, torchrun shards, corrupt files, 224 px."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

from stochvit.cli import main
from stochvit.data import ImageSet, UnreadableImage, load_data
from stochvit.eval.metrics import classification_metrics
from stochvit.predict import dataset_probs
from stochvit.scale import train_batches
from stochvit.stream import StreamSet, decoded_bytes, memory_budget
from stochvit.train import TrainConfig, train


def make_folder(root: Path, classes: dict[str, int], size: int = 32, fmt: str = "png") -> Path:
    g = torch.Generator().manual_seed(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            write_file(str(root / name / f"{i:03d}.{fmt}"), encode_png(img) if fmt == "png" else encode_jpeg(img))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("folder"), {"a": 20, "b": 20, "c": 20})  # split 48 / 6 / 6


def test_streamed_folder_has_the_in_memory_split_pixels_and_evaluation(folder):
    spec = f"imagefolder:{folder}"
    memory, stream = load_data(spec, data_mode="memory"), load_data(spec, data_mode="stream")
    assert isinstance(memory.test, ImageSet) and isinstance(stream.test, StreamSet)
    assert memory.describe() == stream.describe()
    assert (memory.mean, memory.std) == (stream.mean, stream.std)
    for part in ("train", "val", "test"):
        m, s = getattr(memory, part).tensors(), getattr(stream, part).tensors()
        assert torch.equal(m[0], s[0]) and torch.equal(m[1], s[1]), f"{part}: same images, same order, same labels"
    torch.manual_seed(5)
    aug_m = torch.stack([memory.train[i][0] for i in range(8)])
    torch.manual_seed(5)
    aug_s = torch.stack([stream.train[i][0] for i in range(8)])
    assert torch.equal(aug_m, aug_s), "small images: the in-memory crop-with-padding + flip, draw for draw"
    stream.test.workers = 2  # decoded in DataLoader worker processes
    net = timm.create_model("vit_tiny_patch4_32", num_classes=3, img_size=32, depth=2).eval()
    got = [classification_metrics(p[0], y) for p, y in (dataset_probs(net, d.test) for d in (memory, stream))]
    assert got[0] == got[1]
    subsets = [load_data(f"{spec}:classes=c,a", data_mode=m) for m in ("memory", "stream")]
    assert subsets[0].describe() == subsets[1].describe() and subsets[1].class_names == ["c", "a"]
    assert all(torch.equal(a, b) for a, b in zip(subsets[0].test.tensors(), subsets[1].test.tensors()))


def test_resized_folder_streams_the_same_pixels(tmp_path):
    make_folder(tmp_path, {"a": 10, "b": 10}, size=20)
    memory, stream = (load_data(f"imagefolder:{tmp_path}", img_size=16, data_mode=m) for m in ("memory", "stream"))
    assert stream.img_size == 16 and torch.equal(memory.test.tensors()[0], stream.test.tensors()[0])


def test_auto_streams_past_the_memory_budget(folder, capsys):
    spec = f"imagefolder:{folder}"
    size = 60 * 3 * 32 * 32
    from stochvit.data import list_folders

    assert decoded_bytes(list_folders(folder), None) == size
    assert isinstance(load_data(spec, memory_budget=size).train, ImageSet)
    assert "streaming" not in capsys.readouterr().err
    assert isinstance(load_data(spec, memory_budget=size - 1).train, StreamSet)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "streaming" in lines[0] and "memory budget" in lines[0]
    assert 0 < memory_budget() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ValueError, match="imagefolder"):
        load_data("digits", data_mode="stream")


def test_two_torchrun_processes_draw_disjoint_shards_covering_the_train_split(folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_shards.py")), str(folder), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["train"] == ranks[1]["train"], "both ranks hold the same seeded split"
    train = ranks[0]["train"]
    a, b = (set(r["drawn"]) for r in ranks)
    assert len(train) == 48 and not a & b and a | b == set(train), "disjoint shards covering the training split"
    assert [len(r["drawn"]) for r in ranks] == [24, 24] == [r["batches"] for r in ranks]


def test_corrupt_file_in_a_worker_is_one_clear_error_naming_it(tmp_path, capsys):
    make_folder(tmp_path, {"a": 10, "b": 10})
    data = load_data(f"imagefolder:{tmp_path}", data_mode="stream")
    bad = data.train.paths[3]
    Path(bad).write_bytes(b"not an image")
    with pytest.raises(UnreadableImage) as caught:
        for _ in train_batches(data.train, 4, torch.device("cpu"), workers=2):
            pass
    assert str(caught.value).startswith(f"cannot decode image {bad}:") and "Traceback" not in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1
    code = main(["train", "--data", f"imagefolder:{tmp_path}", "--data-mode", "stream", "--workers", "2",
                 "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("stochvit train: error: cannot decode image") and bad in err[-1]
    assert not (tmp_path / "run").exists()


def test_deit_tiny_with_stochastify_trains_on_a_streamed_224_folder(tmp_path):
    make_folder(tmp_path / "data", {"cat": 8, "dog": 8}, size=240, fmt="jpg")
    cfg = TrainConfig(data=f"imagefolder:{tmp_path / 'data'}", data_mode="stream", img_size=224,
                      model="deit_tiny_patch16_224", epochs=1, batch_size=6, warmup_epochs=0, eval_samples=1)
    run = train(cfg, out=tmp_path / "run", quiet=True)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["img_size"] == 224 and config["stochastic"]["kind"] == "diagonal"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["train_loss"] > 0 and (run / "summary.json").exists()
    from stochvit.runs import load_run

    model = load_run(run).model
    assert sum(type(m).__name__ == "StochasticLinear" for m in model.modules()) == 12, "every DeiT block's MLP"
