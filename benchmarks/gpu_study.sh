#!/usr/bin/env bash
# The CIFAR-10 study at a GPU budget, as one call: benchmarks/gpu_study.sh OUT_DIR
#
# Runs benchmarks/studies/cifar10-gpu.toml (2 methods x 3 seeds, 40,000 images x 100 epochs, bf16, compile, device
# augmentation, 6 runs side by side) with its results under OUT_DIR (runs/, report/, logs/), and writes there
#   device.txt    the GPU (nvidia-smi) or "cpu", with torch's view of it
#   spec.toml     the spec as run (paths made absolute, out = OUT_DIR, the size's overrides)
#   timings.json  wall seconds of training and report, whether the budget stopped training, per-run train seconds
#                 and images/s (every run's metrics.jsonl)
# Training stops at GPU_STUDY_BUDGET_S seconds (default 540, so that start-up, report and all fit in 10 minutes on
# one H200); every run checkpoints each epoch, so a second call resumes it, and the report then covers what finished.
#
# GPU_STUDY_SIZE=toy runs the same spec at a toy size on any machine (tests/test_gpu_study.py does, on CPU):
# GPU_STUDY_DATA (default digits) for data, seeds 0-1, 1 epoch, batch 32, no compile, 2 jobs of 1 thread, 2 samples.
set -euo pipefail

OUT=${1:?usage: benchmarks/gpu_study.sh OUT_DIR}
SIZE=${GPU_STUDY_SIZE:-full}
BUDGET=${GPU_STUDY_BUDGET_S:-540}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
case "$SIZE" in full|toy) ;; *) echo "gpu_study.sh: GPU_STUDY_SIZE must be full or toy, not $SIZE" >&2; exit 2;; esac
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s.%N)

"$PYTHON" - "$HERE/studies/cifar10-gpu.toml" "$OUT" "$SIZE" "${GPU_STUDY_DATA:-digits}" <<'EOF'
"""Write OUT/spec.toml: the GPU spec with absolute paths, out = OUT, and (toy) the toy overrides."""
import json
import sys
import tomllib
from pathlib import Path

src, out, size, toy_data = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
spec = tomllib.loads(src.read_text())
data = spec["train"]["data"]
if data.startswith("imagefolder:") and not Path(data.split(":", 1)[1]).is_absolute():
    spec["train"]["data"] = "imagefolder:" + str((src.parent / data.split(":", 1)[1]).resolve())
spec["out"] = str(out)
if size == "toy":
    spec.update(jobs=2, threads=1, seeds=spec["seeds"][:2])
    spec["train"].update(data=toy_data, epochs=1, batch_size=32, warmup_epochs=0.5, compile=False, val_every=1,
                         eval_samples=2)
    for ensemble in spec.get("ensembles", {}).values():
        ensemble["size"] = 2
    spec["calibration"].update(samples=2, shift_images=40)
    if toy_data.startswith("imagefolder:"):
        spec["train"]["data"] = "imagefolder:" + str(Path(toy_data.split(":", 1)[1]).resolve())


def value(v):
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    return json.dumps(v)  # strings, numbers and booleans are spelled alike in JSON and TOML


def table(name, body):
    return [f"[{name}]", *(f"{json.dumps(k)} = {value(v)}" for k, v in body.items())]


lines = [f"{json.dumps(k)} = {value(v)}" for k, v in spec.items() if not isinstance(v, dict)]
for k, v in spec.items():
    if k in ("methods", "ensembles"):  # tables of tables: [methods."name"]
        for m, body in v.items():
            lines += ["", *table(f"{k}.{json.dumps(m)}", body)]
    elif isinstance(v, dict):
        lines += ["", *table(k, v)]
(out / "spec.toml").write_text("\n".join(lines) + "\n")
assert tomllib.loads((out / "spec.toml").read_text()) == spec, "spec.toml does not read back as written"
EOF

{
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo cpu
  fi
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
} > "$OUT/device.txt"

T1=$(date +%s.%N)
set +e
timeout --signal=TERM "$BUDGET" "$PYTHON" -m stochvit study "$OUT/spec.toml" > "$OUT/study.log" 2>&1
RC=$?
set -e
T2=$(date +%s.%N)
if [ "$RC" -ne 0 ]; then  # stopped by the budget (124) or failed: report on what finished
  echo "gpu_study.sh: the study exited with status $RC; reporting on the finished runs" | tee -a "$OUT/study.log" >&2
  "$PYTHON" -m stochvit study "$OUT/spec.toml" --no-train >> "$OUT/study.log" 2>&1 || true
fi
T3=$(date +%s.%N)

"$PYTHON" - "$OUT" "$RC" "$BUDGET" "$T0" "$T1" "$T2" "$T3" <<'EOF'
"""OUT/timings.json: wall seconds of each phase and every run's training time and throughput."""
import json
import sys
from pathlib import Path

out, rc, budget = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
t0, t1, t2, t3 = map(float, sys.argv[4:8])
runs = {}
for run in sorted((out / "runs").glob("*")):
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    runs[run.name] = dict(finished=(run / "summary.json").exists(), epochs=len(rows),
                          train_seconds=sum(r["epoch_seconds"] for r in rows),
                          last_epoch_images_per_s=rows[-1]["train_images_per_s"] if rows else None)
timings = dict(study_exit_status=rc, stopped_by_budget=rc == 124, budget_s=budget, setup_s=t1 - t0, study_s=t2 - t1,
               report_after_stop_s=t3 - t2, total_s=t3 - t0, runs=runs)
(out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
print(json.dumps(timings, indent=2))
EOF
