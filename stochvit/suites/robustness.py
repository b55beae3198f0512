"""`stochvit robustness`: adaptive adversarial evaluation of a run, with a built-in gradient-obfuscation sanity report.

The protocol follows AutoAttack's "rand" version (APGD-CE + APGD-DLR with EOT 20, worst case per example) and the
checklists of Athalye et al. 2018 and Carlini et al. 2019: naive and EOT gradients, a score-based black box (Square)
and a transfer attack are all run, and the report FLAGs any ordering between them that only gradient masking
(or a broken evaluation) can produce. Outputs: robustness.json, robustness.md, robust_accuracy.png and
adversarial_examples.png, written into a temporary folder and renamed into place when complete.

Every robust accuracy (clean, each attack, the worst case; mean and all-pass) carries a 95% percentile-bootstrap
interval over the attacked examples (`stochvit.eval.stats.interval` on the per-example outcomes, which robustness.json
keeps under "per_example" so that runs attacked on the same examples can be compared pairwise with
`stochvit.eval.stats.compare`). One run: the interval covers the sampling of test examples, not of training.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..defaults import PRECISIONS
from ..errors import UserError
from ..eval import attacks as A
from ..eval.stats import Scores, interval
from ..layers import is_random
from ..precision import autocast, resolve_device
from ..runs import Run, atomic_output_dir, check_compatible, check_output_dir, data_for, load_run, write_json
from .settings import ROBUSTNESS_ATTACKS, ROBUSTNESS_DEFAULT_ATTACKS, Result, record
from .settings import RobustnessSettings as Settings

ATTACKS, DEFAULT_ATTACKS = ROBUSTNESS_ATTACKS, ROBUSTNESS_DEFAULT_ATTACKS
WHITE_BOX = ("fgsm", "pgd", "eot-pgd", "apgd-ce", "apgd-dlr", "aa-rand")
DESCRIPTIONS = {
    "fgsm": "one signed-gradient step, no EOT",
    "pgd": "naive PGD: one stochastic pass per gradient",
    "eot-pgd": "PGD with gradients averaged over --eot passes",
    "apgd-ce": "APGD, cross-entropy, EOT",
    "apgd-dlr": "APGD, DLR loss, EOT",
    "aa-rand": "AutoAttack-rand-style: worst case of APGD-CE and APGD-DLR per example",
    "square": "Square (score-based black box), margin averaged over --eot passes",
    "transfer": "EOT-PGD on the --surrogate run, evaluated on this one",
}
LARGE_EPS = {"linf": 0.5, "l2": None}  # l2: half the diameter of the [0,1] cube, 0.5 * sqrt(dims)


def eps_label(eps: float, norm: str) -> str:
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


def validate(s: Settings) -> None:
    """Refuse settings the attacks cannot run with, naming the setting."""
    if s.norm not in A.NORMS:
        raise UserError(f"norm={s.norm!r} is not one of {', '.join(A.NORMS)}")
    for name in ("eot", "steps", "restarts", "queries", "passes", "n_examples", "batch_size", "n_boot"):
        if getattr(s, name) < 1:
            raise UserError(f"{name}={getattr(s, name)} must be >= 1")
    if not s.eps:
        raise UserError("eps needs at least one value")
    if s.precision not in PRECISIONS:
        raise UserError(f"precision={s.precision!r} is not one of {', '.join(PRECISIONS)}")
    unknown = [a for a in s.attacks if a not in ATTACKS]
    if unknown:
        raise UserError(f"unknown attacks {unknown}; choose from {', '.join(ATTACKS)}")



SKIP_RULE = " Examples that no clean pass classifies correctly are not attacked: they count as non-robust anyway."
CASCADE_RULE = (" Epsilon cascade: an adversarial image found at a smaller epsilon lies inside every larger ball, so each "
                "attack's result for an example at an epsilon is the lower of its result there and at the next smaller "
                "epsilon, and an example that every fresh pass got wrong at a smaller epsilon is not attacked again (its "
                "result stays 0, whatever a new attack would find). This never raises a robust accuracy; the large-epsilon "
                "and more-iterations checks follow the same rule.")


def rule_text(passes: int, random: bool, cascade: bool = False) -> str:
    tail = SKIP_RULE + (CASCADE_RULE if cascade else "")
    if not random:
        return ("Deterministic model: one pass per evaluation. An example is robust at an epsilon if it is classified "
                "correctly on its clean image and on the attack's adversarial image; 'mean' and 'all-pass' coincide."
                + tail)
    return (f"Randomized model: every clean and adversarial image is re-evaluated over {passes} fresh stochastic passes "
            "(independent of the passes the attack used). 'mean' is the accuracy averaged over passes (per example the "
            "lower of its clean and adversarial pass-accuracy); 'all-pass' counts an example as robust only if it survives "
            f"all {passes} passes on both its clean and its adversarial image. 'worst case' takes, per example, the "
            "weakest result over all attacks run." + tail)


# -- running attacks ------------------------------------------------------------------------------
def _attack(name: str, model, x, y, eps: float, s: Settings, surrogate=None, steps: int | None = None) -> torch.Tensor:
    steps = steps or s.steps
    if name == "fgsm":
        return A.fgsm(model, x, y, eps, s.norm)
    if name == "pgd":
        return A.pgd(model, x, y, eps, s.norm, steps=steps, restarts=s.restarts)
    if name == "eot-pgd":
        return A.pgd(model, x, y, eps, s.norm, steps=steps, restarts=s.restarts, eot=s.eot)
    if name in ("apgd-ce", "apgd-dlr"):
        return A.apgd(model, x, y, eps, s.norm, steps=steps, loss=name.split("-")[1], eot=s.eot, restarts=s.restarts)
    if name == "square":
        return A.square(model, x, y, eps, s.norm, queries=s.queries, eot=s.eot)
    if name == "transfer":
        return A.transfer(surrogate, x, y, eps, s.norm, steps=steps, eot=s.eot, restarts=s.restarts)
    raise ValueError(name)


def _run(name: str, model, x, y, eps: float, s: Settings, surrogate=None, steps: int | None = None,
         active: torch.Tensor | None = None) -> torch.Tensor:
    """One attack over the `active` examples (default all), `s.batch_size` at a time; the others are returned clean.

    Examples misclassified by every clean pass count as non-robust whatever their adversarial image (robust accuracy
    is min(clean, adversarial)), so skipping them changes no number and saves the attack budget on them.
    """
    ids = torch.arange(len(x), device=x.device) if active is None else active.nonzero().flatten()
    x_adv = x.clone()
    b = s.batch_size
    for i in range(0, len(ids), b):
        j = ids[i:i + b]
        x_adv[j] = _attack(name, model, x[j], y[j], eps, s, surrogate, steps)
    return x_adv


def _correct(model, x: torch.Tensor, y: torch.Tensor, s: Settings) -> torch.Tensor:
    b = s.batch_size
    return torch.cat([A.correct_fraction(model, x[i:i + b], y[i:i + b], s.passes) for i in range(0, len(x), b)])


def _fractions(model, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, s: Settings) -> torch.Tensor:
    """Per example: min(clean pass-accuracy, adversarial pass-accuracy) over fresh passes."""
    return torch.minimum(clean, _correct(model, x_adv, y, s))


def _summary(frac: torch.Tensor, n_boot: int | None = None) -> dict:
    """Mean and all-pass robust accuracy of per-example pass fractions; with n_boot, their 95% intervals ("ci")."""
    out = dict(mean=frac.mean().item(), all_pass=(frac == 1).float().mean().item())
    if n_boot:
        values = dict(mean=frac.double().cpu(), all_pass=(frac == 1).double().cpu())
        out["ci"] = {k: list(interval(Scores.per_image(v), n_boot=n_boot)) for k, v in values.items()}
    return out


def _pick_examples(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded random subset (test splits may be sorted by class), kept in index order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].sort().values


def grid_examples(y: torch.Tensor, n: int = 6) -> torch.Tensor:
    """Which examples adversarial_examples.png shows: the first of each class, then the next ones, up to n. The first n
    alone can all be one class (a test split held out in folder order is sorted by class)."""
    first: dict[int, int] = {}
    for i, c in enumerate(y.tolist()):
        first.setdefault(c, i)
    ids = list(first.values())[:n]
    ids += [i for i in range(len(y)) if i not in first.values()][: n - len(ids)]
    return torch.tensor(sorted(ids), dtype=torch.long)


Prev = tuple[torch.Tensor, torch.Tensor | None]  # one attack's (fractions, adversarial images) at the next smaller eps


def _cascade_step(make, model, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, s: Settings,
                  prev: Prev | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One attack at one epsilon: (adversarial images, per-example fractions, this epsilon's attack alone, attacked mask).

    `make(active)` returns adversarial images with the `active` examples attacked. Without the eps cascade every
    example a clean pass gets right is attacked and all are re-evaluated. With it (`s.eps_cascade`; `prev` is the same
    attack's outcome at the next smaller epsilon, whose ball lies inside this one) the fraction is min(this attack,
    prev), so an example at 0 in `prev` stays 0 whatever an attack finds: it is not attacked again, keeps its earlier
    adversarial image, and only attacked examples are re-evaluated (the others are 0 either way)."""
    active = clean > 0
    if not s.eps_cascade:
        x_adv = make(active)
        frac = _fractions(model, x_adv, y, clean, s)
        return x_adv, frac, frac, active
    if prev is not None:
        active = active & (prev[0] > 0)
    x_adv = make(active)
    if prev is not None and prev[1] is not None:
        x_adv = torch.where(active.view(-1, *([1] * (x.dim() - 1))), x_adv, prev[1])
    raw = torch.zeros_like(clean)
    if active.any():
        raw[active] = _fractions(model, x_adv[active], y[active], clean[active], s)
    return x_adv, raw if prev is None else torch.minimum(raw, prev[0]), raw, active


def _attack_all(model, sur, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, s: Settings, attacks: list[str],
                quiet: bool) -> tuple[dict, dict, dict, dict[str, Prev], dict[float, torch.Tensor], str]:
    """Every attack at every epsilon, smallest epsilon first: (robustness.json's "attacks", per-example fractions per
    attack and epsilon, the same for each epsilon's attack alone (before the cascade), each attack's outcome at the
    largest epsilon, the adversarial images shown per epsilon, and the attack that made them)."""
    results: dict = {}
    fractions: dict[str, dict[float, torch.Tensor]] = {a: {} for a in attacks}
    raw_fractions: dict[str, dict[float, torch.Tensor]] = {a: {} for a in attacks}
    done: dict[tuple[str, float], tuple] = {}  # (attack, eps) -> _cascade_step's outcome and seconds; aa-rand reuses APGD's
    last: dict[str, Prev] = {}  # per attack, its outcome at the last epsilon done
    shown: dict[float, torch.Tensor] = {}
    shown_by = "none"
    grid_ids = grid_examples(y.cpu())
    b = s.batch_size

    def step(name: str, eps: float) -> tuple:
        if (name, eps) in done:
            return done[name, eps]
        if name == "aa-rand":  # its seconds include the APGD-CE/DLR runs it reuses, as if run for it
            parts = [step(part, eps) for part in ("apgd-ce", "apgd-dlr")]

            def make(active: torch.Tensor) -> torch.Tensor:
                ids, x_adv = active.nonzero().flatten(), x.clone()
                for i in range(0, len(ids), b):
                    j = ids[i:i + b]
                    x_adv[j] = A.worst_case(model, [p[0][j] for p in parts], y[j], s.eot)
                return x_adv
        else:
            parts = []

            def make(active: torch.Tensor) -> torch.Tensor:
                return _run(name, model, x, y, eps, s, sur, active=active)
        t = time.perf_counter()
        out = _cascade_step(make, model, x, y, clean, s, last.get(name))
        last[name] = out[1], out[0]
        done[name, eps] = (*out, time.perf_counter() - t + sum(p[4] for p in parts))
        return done[name, eps]

    bar = tqdm(total=len(attacks) * len(s.eps), desc="attacks", disable=quiet, mininterval=1)
    for name in attacks:
        results[name] = {}
        for eps in s.eps:
            bar.set_postfix(attack=name, eps=eps_label(eps, s.norm))
            x_adv, frac, raw, active, seconds = step(name, eps)
            _check_ball(x_adv, x, eps, s.norm, name)
            fractions[name][eps], raw_fractions[name][eps] = frac, raw
            cell = dict(eps=eps, **_summary(frac, s.n_boot), seconds=seconds, attacked=int(active.sum()))
            if s.eps_cascade:
                cell["mean_before_cascade"] = raw.mean().item()
            results[name][eps_label(eps, s.norm)] = cell
            if name in WHITE_BOX and (eps not in shown or name == "aa-rand"):
                shown[eps], shown_by = x_adv[grid_ids].cpu(), name
            bar.update()
    bar.close()
    return results, fractions, raw_fractions, {a: last[a] for a in attacks}, shown, shown_by


def evaluate_robustness(run: Run, s: Settings, data_spec: str | None = None, data_dir: str | None = None,
                        surrogate: Run | None = None, quiet: bool = False) -> tuple[dict, dict]:
    """Run every attack at every epsilon; returns (result for robustness.json, adversarial images for the grid).

    Every forward pass of the model and the surrogate, the attacks' gradient passes included, runs under
    `s.precision`'s autocast (`stochvit.precision`); the losses are taken in fp32."""
    validate(s)
    if "transfer" in s.attacks and surrogate is None:
        raise UserError("the transfer attack needs a surrogate run (surrogate=RUN_DIR, trained on the same data)")
    data = data_for(run.config, data_spec, data_dir)
    check_compatible(run.config, data)
    if surrogate is not None:
        check_compatible(surrogate.config, data)
    device = resolve_device(s.device)
    model = run.model.to(device).eval()
    sur = surrogate.model.to(device).eval() if surrogate is not None else None
    torch.manual_seed(s.seed)
    x_all, y_all = data.test.tensors()
    idx = _pick_examples(len(y_all), s.n_examples, s.seed)
    x, y = x_all[idx].to(device), y_all[idx].to(device)
    head = dict(run=str(run.path), data=data.name, split="test", test_source=data.test_source())
    result, shown, shown_by = attack_examples(model, x, y, s, sur, quiet, head)
    result["per_example"] = dict(index=idx.tolist(), **result["per_example"])
    grid_ids = grid_examples(y.cpu()).to(y.device)  # the examples `shown` holds
    grid = dict(x=x[grid_ids].cpu(), y=y[grid_ids].cpu(), adv=shown, attack=shown_by, model=model)
    return result, grid


def attack_examples(model, x: torch.Tensor, y: torch.Tensor, s: Settings, sur=None, quiet: bool = True,
                    head: dict | None = None) -> tuple[dict, dict[float, torch.Tensor], str]:
    """The suite on images already on the model's device: (robustness.json's content after `head`, the adversarial
    images shown per epsilon, the attack that made them). The caller seeds torch."""
    s = replace(s, eps=sorted(s.eps))  # smallest first: the eps cascade builds on the smaller balls
    random = is_random(model)
    attacks = [a for a in ATTACKS if a in s.attacks]  # canonical order; aa-rand reuses the APGD runs
    t0 = time.perf_counter()
    with autocast(s.precision, x.device, model), (autocast(s.precision, x.device, sur) if sur is not None else nullcontext()):
        clean = _correct(model, x, y, s)
        result: dict = dict(
            **(head or {}), n_examples=len(y), norm=s.norm, randomized=random, settings=record(s),
            rule=rule_text(s.passes, random, s.eps_cascade), clean=_summary(clean, s.n_boot),
            clean_seconds=time.perf_counter() - t0, attacks={}, worst_case={},
            descriptions={a: DESCRIPTIONS[a] for a in attacks})
        if not random:
            result["note"] = "deterministic model: EOT averages one pass, so eot-pgd equals pgd up to its random start"
        result["attacks"], fractions, raw, last, shown, shown_by = _attack_all(model, sur, x, y, clean, s, attacks, quiet)
        for eps in s.eps:
            worst = torch.stack([fractions[a][eps] for a in attacks]).amin(0) if attacks else clean
            fractions.setdefault("worst_case", {})[eps] = worst
            cell = result["worst_case"][eps_label(eps, s.norm)] = dict(eps=eps, **_summary(worst, s.n_boot))
            if s.eps_cascade and attacks:  # what check 1 reads: a rise there is an attack weaker at a larger epsilon
                cell["mean_before_cascade"] = torch.stack([raw[a][eps] for a in attacks]).amin(0).mean().item()
        if s.sanity:
            large = LARGE_EPS[s.norm] or 0.5 * math.sqrt(x[0].numel())
            result["sanity"] = sanity_checks(result, model, x, y, clean, s, large, fractions, last)
    result["seconds"] = time.perf_counter() - t0
    # per example: the fraction of fresh passes it survives, clean and per attack and epsilon; robust under the
    # all-pass rule where it is 1
    result["per_example"] = dict(clean=clean.cpu().tolist(), **{
        a: {eps_label(e, s.norm): f.cpu().tolist() for e, f in per.items()} for a, per in fractions.items()})
    return result, shown, shown_by


def _check_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, name: str) -> None:
    """Guard against a broken attack: it must stay inside the eps-ball and the [0, 1] box."""
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"{name} left the {norm} ball of radius {eps} or the [0,1] box (max size {size.max().item():.6f})")


# -- sanity report --------------------------------------------------------------------------------
def _tol(p: float, n: int) -> float:
    """Two binomial standard errors (at least 2 examples): the slack allowed between two attacks' accuracies."""
    return max(2.0 / n, 2.0 * math.sqrt(max(p * (1 - p), 0.0) / n))


def _check(name: str, ok: bool | None, detail: str) -> dict:
    return dict(check=name, status="SKIP" if ok is None else ("PASS" if ok else "FLAG"), detail=detail)


def _below(eps: float, s: Settings) -> float | None:
    """The next smaller epsilon of the run (None for the smallest)."""
    smaller = [e for e in s.eps if e < eps]
    return max(smaller) if smaller else None


def _falls_with_eps(result: dict, model, x, y, clean, s: Settings, large_eps: float, last: dict) -> dict:
    """Check 1: accuracy falls with eps and reaches ~0 at a large eps (runs the large-eps attack).

    Under the eps cascade the worst case cannot rise by construction, so rises are sought in each epsilon's attacks
    alone ("mean_before_cascade"), and the large-eps attack builds on the largest epsilon's outcome like any other."""
    n, labels = len(y), [eps_label(e, s.norm) for e in s.eps]
    key = "mean_before_cascade" if s.eps_cascade else "mean"
    worst = [result["worst_case"][lab].get(key, result["worst_case"][lab]["mean"]) for lab in labels]
    rises = [(labels[i], labels[i + 1]) for i in range(len(worst) - 1) if worst[i + 1] > worst[i] + _tol(worst[i], n)]
    main = next((a for a in ("eot-pgd", "apgd-ce", "pgd") if a in s.attacks), "eot-pgd")
    start = time.perf_counter()
    _, big, _, active = _cascade_step(lambda act: _run(main, model, x, y, large_eps, s, active=act), model, x, y, clean, s,
                                      last.get(main))
    big_acc = _summary(big)
    result["large_eps"] = dict(attack=main, eps=large_eps, **big_acc, seconds=time.perf_counter() - start,
                               attacked=int(active.sum()))
    return _check(
        "accuracy falls as epsilon grows and reaches ~0 at a large epsilon", not rises and big_acc["mean"] <= 0.05,
        f"worst-case mean accuracy{' (each epsilon before the cascade)' if s.eps_cascade else ''} "
        f"{', '.join(f'{w:.3f}' for w in worst)} at eps {', '.join(labels)}"
        + (f"; rises between {rises}" if rises else "")
        + f"; {main} at eps={large_eps:.3g}: {big_acc['mean']:.3f} (want <= 0.05)")


def _more_iterations(result: dict, model, x, y, clean, s: Settings, fractions: dict) -> dict:
    """Check 2: four times the iterations is not weaker (runs the longer attack at the middle epsilon, on the examples
    the main run attacked there: under the eps cascade both start from the same next-smaller-epsilon outcome)."""
    mid = s.eps[len(s.eps) // 2]
    lab = eps_label(mid, s.norm)
    it_attack = next((a for a in ("eot-pgd", "pgd", "apgd-ce") if a in s.attacks), None)
    if it_attack is None:
        return _check("more iterations are not weaker", None, "no iterative attack was run")
    start = time.perf_counter()
    below = _below(mid, s)
    prev = (fractions[it_attack][below], None) if below is not None else None
    _, longer, _, active = _cascade_step(lambda act: _run(it_attack, model, x, y, mid, s, steps=4 * s.steps, active=act),
                                         model, x, y, clean, s, prev)
    more = _summary(longer)
    base = result["attacks"][it_attack][lab]["mean"]
    result["more_iterations"] = dict(attack=it_attack, eps=mid, steps=4 * s.steps, **more, seconds=time.perf_counter() - start,
                                     attacked=int(active.sum()))
    return _check("more iterations are not weaker", more["mean"] <= base + _tol(base, len(y)),
                  f"{it_attack} at eps {lab}: {s.steps} steps {base:.3f}, {4 * s.steps} steps {more['mean']:.3f}")


def _orderings(att: dict, labels: list[str], n: int) -> list[dict]:
    """Checks 3-5 from the attacks already run: EOT is not weaker than no EOT, white-box is not weaker than Square,
    transfer is not stronger than white-box."""
    checks = []
    if "pgd" in att and "eot-pgd" in att:
        bad = [lb for lb in labels if att["eot-pgd"][lb]["mean"] > att["pgd"][lb]["mean"] + _tol(att["pgd"][lb]["mean"], n)]
        checks.append(_check("EOT is not weaker than no EOT", not bad, "eot-pgd vs pgd mean accuracy: " + ", ".join(
            f"{lb}: {att['eot-pgd'][lb]['mean']:.3f} vs {att['pgd'][lb]['mean']:.3f}" for lb in labels)))
    else:
        checks.append(_check("EOT is not weaker than no EOT", None, "needs both pgd and eot-pgd"))
    white = [a for a in WHITE_BOX if a in att]

    def best_white(lb: str) -> tuple[str, float]:
        name = min(white, key=lambda a: att[a][lb]["mean"])
        return name, att[name][lb]["mean"]

    for other, title, weaker_is_bad in (("square", "white-box is not weaker than the black-box Square attack", True),
                                        ("transfer", "the transfer attack is not stronger than white-box", False)):
        if other not in att or not white:
            checks.append(_check(title, None, f"needs {other} and a white-box attack"))
            continue
        rows, bad = [], []
        for lb in labels:
            wname, w = best_white(lb)
            o = att[other][lb]["mean"]
            rows.append(f"{lb}: {wname} {w:.3f} vs {other} {o:.3f}")
            if (w > o + _tol(o, n)) if weaker_is_bad else (o < w - _tol(w, n)):
                bad.append(lb)
        checks.append(_check(title, not bad, "; ".join(rows)))
    return checks


def sanity_checks(result: dict, model, x, y, clean, s: Settings, large_eps: float, fractions: dict,
                  last: dict) -> list[dict]:
    """PASS/FLAG per check of the gradient-obfuscation checklist; SKIP when the attacks it compares were not run.
    `fractions` and `last`: _attack_all's per-example fractions and each attack's outcome at the largest epsilon."""
    return [_falls_with_eps(result, model, x, y, clean, s, large_eps, last),
            _more_iterations(result, model, x, y, clean, s, fractions),
            *_orderings(result["attacks"], [eps_label(e, s.norm) for e in s.eps], len(y))]


# -- outputs --------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    s = result["settings"]
    labels = list(result["worst_case"])
    lines = [f"# Robustness of `{result['run']}`", "",
             f"{result['data']} test split, {result['n_examples']} examples, {result['norm']} threat model; "
             f"EOT {s['eot']}, {s['steps']} steps, {s['restarts']} restart(s), "
             + (f"Square {s['queries']} queries, " if "square" in s["attacks"] else "")
             + f"{s['passes']} evaluation passes; total {result['seconds']:.0f} s.", "",
             *([f"Test images drawn from: {result['test_source']}.", ""] if result.get("test_source") else []),
             f"**Rule.** {result['rule']}", "",
             "Robust accuracy, mean / all-pass:", "",
             "| attack | " + " | ".join(f"eps {lb}" for lb in labels) + " | seconds |",
             "|---|" + "---|" * (len(labels) + 1)]
    c = result["clean"]
    lines.append("| clean | " + " | ".join(f"{c['mean']:.3f} / {c['all_pass']:.3f}" for _ in labels) +
                 f" | {result['clean_seconds']:.1f} |")
    for name, per in result["attacks"].items():
        cells = [f"{per[lb]['mean']:.3f} / {per[lb]['all_pass']:.3f}" for lb in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(v['seconds'] for v in per.values()):.1f} |")
    w = result["worst_case"]
    cells = [f"**{w[lb]['mean']:.3f} / {w[lb]['all_pass']:.3f}**" for lb in labels]
    lines.append("| **worst case** | " + " | ".join(cells) + " | |")
    if s.get("eps_cascade"):
        lines += ["", f"Examples attacked at eps {', '.join(labels)} (the eps cascade skips those already at 0): "
                  + "; ".join(f"{name} {' / '.join(str(per[lb].get('attacked', '-')) for lb in labels)}"
                              for name, per in result["attacks"].items() if name != "aa-rand") + "."]
    lines += _interval_table(result)
    lines += ["", "Attacks: " + "; ".join(f"`{k}` {v}" for k, v in result["descriptions"].items()) + "."]
    if "note" in result:
        lines += ["", f"Note: {result['note']}."]
    if "sanity" in result:
        lines += ["", "## Sanity report", ""]
        for ch in result["sanity"]:
            lines.append(f"- **{ch['status']}** {ch['check']}: {ch['detail']}")
        flags = [ch for ch in result["sanity"] if ch["status"] == "FLAG"]
        lines += ["", (f"**{len(flags)} check(s) FLAGGED: the numbers above are not trustworthy** (gradient masking or a "
                       "too-weak attack budget); raise --steps/--eot/--queries or --restarts before drawing conclusions.")
                  if flags else "All checks that ran PASS: no sign of gradient masking at this budget."]
    return "\n".join(lines) + "\n"


def _ci(cell: dict, key: str) -> str:
    lo, hi = cell["ci"][key]
    return f"{cell[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _interval_table(result: dict) -> list[str]:
    """Robust accuracy with 95% intervals (mean rule per attack; both rules for the worst case)."""
    if "ci" not in result["clean"]:
        return []  # a report written before intervals existed
    labels = list(result["worst_case"])
    n_boot = result["settings"].get("n_boot")
    lines = ["", f"Robust accuracy with 95% intervals: percentile bootstrap over the {result['n_examples']} attacked "
             f"examples ({n_boot} resamples) of their per-example outcomes. One run, so the interval covers the sampling "
             "of test examples only, not training seeds.", "",
             "| attack | " + " | ".join(f"eps {lb}" for lb in labels) + " |", "|---|" + "---|" * len(labels)]
    c = result["clean"]
    lines.append("| clean (mean) | " + " | ".join(_ci(c, "mean") for _ in labels) + " |")
    for name, per in result["attacks"].items():
        lines.append(f"| {name} (mean) | " + " | ".join(_ci(per[lb], "mean") for lb in labels) + " |")
    w = result["worst_case"]
    for key, rule in (("mean", "mean"), ("all_pass", "all-pass")):
        lines.append(f"| **worst case ({rule})** | " + " | ".join(f"**{_ci(w[lb], key)}**" for lb in labels) + " |")
    return lines


def coinciding(curves: dict[str, list[float]]) -> list[list[str]]:
    """Names grouped by identical curves (in first-seen order): lines drawn exactly on top of each other."""
    groups: dict[tuple[float, ...], list[str]] = {}
    for name, values in curves.items():
        groups.setdefault(tuple(round(v, 9) for v in values), []).append(name)
    return list(groups.values())


def close_groups(curves: dict[str, list[float]], tol: float = 0.01) -> list[list[str]]:
    """Groups of two or more curves within `tol` of each other at every point: lines a reader cannot tell apart."""
    out: list[list[str]] = []
    for name, values in curves.items():
        for group in out:
            if all(abs(a - b) < tol for other in group for a, b in zip(values, curves[other])):
                group.append(name)
                break
        else:
            out.append([name])
    return [g for g in out if len(g) > 1]


MARKERS = "osD^vPX*<>"


def figure(result: dict):
    """Robust accuracy against epsilon per attack, the worst cases and the clean accuracy. Attacks with identical
    values are drawn once and labelled together ("pgd = eot-pgd"); the others get their own marker and are nudged
    apart on the x axis, and the title names the ones within 0.01 of each other, so no line hides unsaid."""
    from ..runs import pyplot

    plt = pyplot()

    labels = list(result["worst_case"])
    eps = [result["worst_case"][lb]["eps"] for lb in labels]
    w, c = result["worst_case"], result["clean"]
    has_ci = "ci" in c
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    step = 0.012 * ((max(eps) - min(eps)) or max(eps))
    groups = coinciding({name: [per[lb]["mean"] for lb in labels] for name, per in result["attacks"].items()})
    for i, names in enumerate(groups):
        cells = [result["attacks"][names[0]][lb] for lb in labels]
        label = " = ".join(names)
        shift = (i - (len(groups) - 1) / 2) * step  # attacks nudged apart on the x axis: bars and points stay readable
        err = None
        if has_ci:  # 95% error bars
            err = [[v["mean"] - v["ci"]["mean"][0] for v in cells], [v["ci"]["mean"][1] - v["mean"] for v in cells]]
        ax.errorbar([e + shift for e in eps], [v["mean"] for v in cells], yerr=err, marker=MARKERS[i % len(MARKERS)],
                    markersize=4, capsize=2, elinewidth=0.7, label=label)
    rules = [("mean", "--", "mean", "_"), ("all_pass", ":", "all-pass", "x")]
    if [w[lb]["mean"] for lb in labels] == [w[lb]["all_pass"] for lb in labels]:  # a deterministic model: one line
        rules = [("mean", "--", "mean = all-pass", "_")]
    for key, style, rule, marker in rules:
        ax.plot(eps, [w[lb][key] for lb in labels], "k" + style, lw=2, label=f"worst case ({rule})",
                **(dict(marker=marker, ms=14 if marker == "_" else 7, mew=2) if len(eps) == 1 else {}))  # no line to see
        if has_ci:
            ax.fill_between(eps, [w[lb]["ci"][key][0] for lb in labels], [w[lb]["ci"][key][1] for lb in labels],
                            color="k", alpha=0.12 if key == "mean" else 0.06, linewidth=0)
    ax.axhline(c["mean"], color="grey", lw=1, label="clean")
    if has_ci:
        ax.axhspan(*c["ci"]["mean"], color="grey", alpha=0.12, linewidth=0)
    ax.set_xticks(eps, labels, rotation=45 if len(eps) > 5 else 0)
    ax.set_xlabel(f"epsilon ({result['norm']})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    notes = ["a = b: identical robust accuracy, drawn once"] if any(len(g) > 1 for g in groups) else []
    close = close_groups({" = ".join(g): [result["attacks"][g[0]][lb]["mean"] for lb in labels] for g in groups})
    notes += [f"{', '.join(g)}: within 0.01 at every epsilon (nudged apart)" for g in close]
    ax.set_title("\n".join([Path(result["run"]).name + ("; bars and bands: 95% bootstrap intervals" if has_ci else ""),
                            *notes]), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> None:
    from ..runs import pyplot

    fig = figure(result)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def replot(out: Path) -> list[Path]:
    """Redraw robust_accuracy.png from the saved robustness.json (no attack reruns); the example grid needs the images."""
    from ..runs import read_json

    out = Path(out)
    plot(read_json(out / "robustness.json", "the robustness report to redraw"), out / "robust_accuracy.png")
    return [out / "robust_accuracy.png"]


def plot_grid(grid: dict, result: dict, path: Path, passes: int) -> None:
    from ..runs import pyplot

    plt = pyplot()

    from ..predict import predict_proba

    model, x, y, adv = grid["model"], grid["x"], grid["y"], grid["adv"]
    device = next(model.parameters()).device
    columns = [("clean", x)] + [(f"eps {eps_label(e, result['norm'])}", adv[e]) for e in sorted(adv)]
    fig, axes = plt.subplots(len(x), len(columns), figsize=(1.5 * len(columns), 1.6 * len(x)), squeeze=False)
    precision = result["settings"].get("precision", "fp32")
    for j, (title, imgs) in enumerate(columns):
        with autocast(precision, device, model):
            pred = predict_proba(model, imgs.to(device), passes).argmax(1).cpu()
        for i in range(len(x)):
            img = imgs[i].permute(1, 2, 0).numpy()
            ax = axes[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            caption = f"pred {pred[i].item()} (y={y[i].item()})"
            ax.set_title(f"{title}\n{caption}" if i == 0 else caption, fontsize=7, color="black" if pred[i] == y[i] else "red")
    fig.suptitle(f"{grid['attack']} adversarial examples; prediction averaged over {passes} passes (red: wrong)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, grid: dict, out: Path, passes: int, overwrite: bool = False) -> Path:
    """Write the four files into a report folder at once (`runs.atomic_output_dir`)."""
    with atomic_output_dir(out, result["settings"], "robustness.json", overwrite) as tmp:
        write_json(tmp / "robustness.json", result)
        (tmp / "robustness.md").write_text(markdown(result))
        plot(result, tmp / "robust_accuracy.png")
        plot_grid(grid, result, tmp / "adversarial_examples.png", passes)
    return Path(out)


@dataclass
class RobustnessResult(Result):
    """`out`: the report folder; `report`: what its robustness.json holds."""

    report: dict


def run(s: Settings) -> RobustnessResult:
    """The suite from its settings (what `stochvit robustness` does), written into `s.out` (default RUN_DIR/robustness-NORM)."""
    resolve_device(s.device)  # a device this machine lacks: refused before anything loads
    loaded = load_run(s.run_dir)
    surrogate = load_run(s.surrogate) if s.surrogate else None
    if surrogate is not None and "transfer" not in s.attacks and s.attacks == list(DEFAULT_ATTACKS):
        s = replace(s, attacks=list(ATTACKS))
    s = replace(s, run_dir=str(loaded.path), surrogate=str(surrogate.path) if surrogate else None,  # recorded as loaded
                eps=sorted(s.eps))
    out = Path(s.out) if s.out else loaded.path / f"robustness-{s.norm}"
    check_output_dir(out, record(s), "robustness.json", s.overwrite)
    result, grid = evaluate_robustness(loaded, s, s.data, s.data_dir, surrogate)
    return RobustnessResult(write_outputs(result, grid, out, s.passes, s.overwrite), result)
