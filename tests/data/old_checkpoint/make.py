"""How the old-checkpoint fixture was made, and the tiny ViT it uses (the resume test registers it too).

The fixture is a run directory written by the code before the issue-14 restructuring (commit 82d1682), killed
mid-epoch after its first checkpoint, plus the weights and metrics of the same run left to finish. The digits
ViT's checkpoint (weights and two AdamW moments) is 2.5 MB, so the run uses a 2-block, 16-wide ViT registered in
timm here; nothing else about the run directory differs from a real one.

Rebuild (from the repository root):
    git worktree add --detach /tmp/old 82d1682
    PYTHONPATH=/tmp/old python tests/data/old_checkpoint/make.py /tmp/fixture
    git worktree remove --force /tmp/old
then copy /tmp/fixture/killed/{config.json,metrics.jsonl,metrics.csv,checkpoint.pt} into run/, and
/tmp/fixture/full/model.safetensors and metrics.jsonl to reference.safetensors and reference_metrics.jsonl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODEL = "vit_fixture_patch2_8"
ARCH = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, mlp_ratio=4.0)
# 200 images at batch 50: 4 steps an epoch, 12 in all; the kill at step 6 is inside epoch 1, after epoch 0's checkpoint
ARGS = ["--model", MODEL, "--epochs", "3", "--train-limit", "200", "--batch-size", "50", "--eval-samples", "1",
        "--seed", "7", "--workers", "0"]
KILL_AT = 6


def register() -> None:
    """Register the fixture's ViT in timm (once per process)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(MODEL):
        return

    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
            kwargs.pop(key, None)
        return VisionTransformer(**{**ARCH, "num_classes": 10, **kwargs})

    build.__name__ = MODEL
    register_model(build)


def _train(out: Path, kill_at: int | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["STOCHVIT_KILL_AT_STEP"] = str(kill_at)  # the old code's fault injection: SIGKILL itself at this step
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import make; make.register(); " \
           "from stochvit.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "train", *ARGS, "--out", str(out)], env=env).returncode


if __name__ == "__main__":
    dest = Path(sys.argv[1])
    assert _train(dest / "full") == 0
    assert _train(dest / "killed", KILL_AT) == -9
