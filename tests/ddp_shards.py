"""Run under torchrun by tests/test_stream.py: write the training files this rank's trainer batches would draw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stochvit.data import load_data
from stochvit.scale import train_batches
from stochvit.train import _distributed

if __name__ == "__main__":
    folder, out = sys.argv[1], Path(sys.argv[2])
    rank, world = _distributed()
    data = load_data(f"imagefolder:{folder}", data_mode="stream")
    batches = train_batches(data.train, 4, torch.device("cpu"), world, seed=0)
    batches.set_epoch(3)
    drawn = [data.train.paths[i] for i in batches.sampler]
    (out / f"rank{rank}.json").write_text(json.dumps(dict(world=world, drawn=drawn, train=data.train.paths,
                                                          batches=sum(len(y) for _, y in batches))))
