#!/usr/bin/env bash
# Calibration, robustness and privacy on the two CIFAR-10 protocol runs (benchmarks/cifar10_protocol.sh
# deterministic --no-stochastic; ... stochastic --stochastic), reused as they are: nothing is retrained here.
# CPU-short budgets, the same for both models (session-2 machine: 2-core AMD EPYC without native bf16, fp32):
#   calibration  K=5 passes on the full 5,000-image test split (temperature fitted on the 5,000 validation images);
#                shift: 8 corruptions x 5 severities on a seeded 300-image test subset
#   robustness   1,000 test images, l-inf 1/255..8/255, naive PGD, EOT-PGD and the AutoAttack-rand-style composite
#                (APGD-CE + APGD-DLR) at 5 steps and EOT 2 (AutoAttack: 100 steps, EOT 20), 4 re-evaluation passes;
#                the stochastic model also gets a transfer attack from the deterministic one. No Square attack
#                (1,000 queries x EOT on 1,000 images is hours here), so that sanity check reads SKIP.
#   privacy      split after blocks 1, 3 and 6; decoder (400 steps) and optimisation (150 steps) inversion of
#                16 victim images; attacker's auxiliary set 5,000 training images; noise baseline sigma 0.3 and 1.0
# Adversarial training (session 4): the two protocol runs are fine-tuned with FGSM-RS (Wong et al. 2020; l-inf 8/255,
# step 1.25 eps) for 5 more epochs on the same 10,000 images (lr 5e-4, 1 warmup epoch, then cosine), the same budget for
# both (adversarial training from scratch would cost ~2x a protocol run per model), and get the same robustness budget,
# then a stronger composite (20 steps, EOT 8) at 8/255.
# Two chains run side by side, one core (one OpenMP thread) each. Logs: benchmarks/runs/cifar10/logs/. A step whose
# output folder already holds its JSON is skipped, so the script can be rerun after an interruption (or started per step).
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/runs/cifar10
mkdir -p "$R/logs"
export OMP_NUM_THREADS=1
# timed NAME SUITE ARGS...: `stochvit SUITE ARGS... --out $R/NAME`, skipped when $R/NAME/SUITE.json exists
source benchmarks/steps.sh
timed() { local name=$1 suite=$2; shift 2; step "$R" "$name" "$suite.json" stochvit "$suite" "$@" --out "$R/$name"; }
# the script may start as soon as the deterministic run is done: steps needing the stochastic run wait for it
ready() { until [ -e "$R/$1/summary.json" ]; do sleep 20; done; }
ROB=(--eps 1/255,2/255,4/255,8/255 --n-examples 1000 --steps 5 --eot 2 --passes 4 --batch-size 125)
ready deterministic
{
  timed robustness-deterministic robustness "$R/deterministic" "${ROB[@]}" --attacks pgd,eot-pgd,aa-rand
  ready stochastic
  timed calibration calibration "$R/deterministic" "$R/stochastic" --samples 5 --shift --shift-limit 300
  timed privacy privacy "$R/deterministic" "$R/stochastic" --blocks 1,3,6 --n-victims 16 --aux-limit 5000 \
    --decoder-steps 400 --opt-steps 150 --noise-baseline 0.3,1.0
} &
{ ready stochastic; timed robustness-stochastic robustness "$R/stochastic" "${ROB[@]}" --attacks pgd,eot-pgd,aa-rand,transfer \
  --surrogate "$R/deterministic"; } &
wait
adv() {  # adv NAME CLEAN FLAGS...: FGSM-RS fine-tuning of protocol run CLEAN, skipped when finished before
  local name=$1 clean=$2; shift 2
  step "$R" "$name" summary.json env EPOCHS=5 bash benchmarks/cifar10_protocol.sh "$name" --init-weights "$R/$clean" \
    --adv fgsm-rs --adv-eps 8/255 --lr 5e-4 --warmup-epochs 1 --val-every 5 "$@"
}
{ adv adv-deterministic deterministic --no-stochastic
  timed robustness-adv-deterministic robustness "$R/adv-deterministic" "${ROB[@]}" --attacks pgd,eot-pgd,aa-rand; } &
{ adv adv-stochastic stochastic --stochastic; ready adv-deterministic
  timed robustness-adv-stochastic robustness "$R/adv-stochastic" "${ROB[@]}" --attacks pgd,eot-pgd,aa-rand,transfer \
  --surrogate "$R/adv-deterministic"; } &
wait
# a stronger adaptive attack where the adversarially trained pair differs most (8/255): the composite at 20 steps, EOT 8
STRONG=(--eps 8/255 --n-examples 1000 --steps 20 --eot 8 --passes 4 --batch-size 125 --attacks aa-rand --no-sanity)
timed robustness-adv-deterministic-strong robustness "$R/adv-deterministic" "${STRONG[@]}"
timed robustness-adv-stochastic-strong robustness "$R/adv-stochastic" "${STRONG[@]}"
cat "$R/logs/wall.txt"
