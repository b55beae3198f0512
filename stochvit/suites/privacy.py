"""`stochvit privacy`: how much of the input can a split-inference server reconstruct from block-k features?

For every run, split point k and defence (none, or Gaussian noise on the transmitted features of a
deterministic run at relative levels sigma x RMS of the clean features), the suite measures the
model's accuracy with that defence and the PSNR/SSIM of the decoder and optimisation inversions of
victim test images (threat model and attacks: `stochvit.eval.privacy`). The auxiliary images of the
attacker are the training split; the victims are drawn from the test split, so the two are disjoint.

Outputs (in --out, each written to a temporary name then renamed): privacy.json, privacy.md,
reconstructions.png (originals against reconstructions per run, block, defence and attack) and
privacy_utility.png (attack PSNR/SSIM against accuracy, per block; lower-right is better).
A CIFAR-10 run takes hours on CPU, so each finished configuration is kept beside --out, in .NAME.resume/, until the end:
rerunning the same command after an interruption resumes where it stopped (other settings start over).

Intervals (`stochvit.eval.stats`): every PSNR/SSIM carries a 95% percentile-bootstrap interval over the victim images
(their per-image values are kept in privacy.json), and each stochastic-vs-noise comparison at matched accuracy is a
paired bootstrap over the same victims (the noise side interpolated image by image with np.interp's weights), with
a verdict. One run per side: the intervals cover the sampling of victims, not of training or of the accuracy match.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..defaults import PRECISIONS
from ..errors import UserError
from ..eval.privacy import (
    AttackConfig,
    Device,
    attacker_modes,
    attacker_view,
    decoder_inversion,
    depth,
    feature_rms,
    optimization_inversion,
    parse_blocks,
    reconstruction_metrics,
    split_accuracy,
)
from ..eval.stats import Scores, compare, interval
from ..layers import is_random
from ..precision import resolve_device
from ..runs import (
    Run,
    atomic_output_dir,
    atomic_write_bytes,
    check_compatible,
    check_output_dir,
    data_for,
    load_run,
    read_json,
    write_json,
)
from .settings import PRIVACY_ATTACKS, Result
from .settings import PrivacySettings as Settings

ATTACKS = PRIVACY_ATTACKS
SHOW = 8  # victims shown in the reconstruction grid


class _Partial:
    """Finished configurations of an unfinished `stochvit privacy` run, so the same command resumes after a kill."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.dir = out.with_name(f".{out.name}.resume")  # beside the report folder, which is written at once
        settings = json.loads(json.dumps(settings, default=float))
        meta = self.dir / "settings.json"
        if meta.exists() and read_json(meta, "partial privacy settings") != settings:
            shutil.rmtree(self.dir)  # another command's leftovers: start over
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(meta, settings)
        done = self.dir / "entries.jsonl"
        self.entries = [json.loads(line) for line in done.read_text().splitlines()] if done.exists() else []

    @staticmethod
    def key(run: Run, k: int, sigma: float) -> str:
        return f"{run.path}|{k}|{sigma!r}"

    def get(self, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        for i, e in enumerate(self.entries):
            if e["key"] == key:
                return e["entry"], load_file(str(self.dir / f"{i}.safetensors"))
        return None

    def add(self, key: str, entry: dict, shown: dict[str, torch.Tensor]) -> None:
        i = len(self.entries)
        save_file({k: v.contiguous() for k, v in shown.items()}, str(self.dir / f"{i}.safetensors"))
        self.entries.append(dict(key=key, entry=json.loads(json.dumps(entry, default=float))))
        atomic_write_bytes(self.dir / "entries.jsonl", "".join(json.dumps(e) + "\n" for e in self.entries).encode())

    def clear(self) -> None:
        shutil.rmtree(self.dir)


N_BOOT = 1000


def per_image_metrics(recon: torch.Tensor, original: torch.Tensor) -> dict[str, list[float]]:
    """PSNR (dB) and SSIM of each reconstruction: the per-image values `reconstruction_metrics` summarises."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    recon, original = recon.float().clamp(0, 1), original.float()
    return dict(psnr=peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="none", dim=(1, 2, 3)).tolist(),
                ssim=structural_similarity_index_measure(recon, original, data_range=1.0, reduction="none").tolist())


def _with_intervals(result: dict, recon: torch.Tensor, victims: torch.Tensor, n_boot: int = N_BOOT) -> dict:
    """Adds per-image PSNR/SSIM and their 95% intervals ("ci") to an attack's result."""
    per = per_image_metrics(recon, victims)
    return dict(result, per_image=per, ci={k: list(interval(Scores.per_image(v), n_boot=n_boot)) for k, v in per.items()})


def _run_kind(run: Run) -> str:
    return "stochastic" if is_random(run.model) else "deterministic"


def _plan(runs: list[Run], blocks: str, sigmas: list[float], where: torch.device) -> list[tuple]:
    """(run index, run, model on `where`, split point k, relative noise level) of every configuration, in order."""
    plan = []
    for i, run in enumerate(runs):
        model = run.model.to(where).eval()
        deterministic = not is_random(model)
        for k in parse_blocks(blocks, depth(model)):
            for sigma in [0.0] + (sigmas if deterministic else []):
                plan.append((i, run, model, k, sigma))
    return plan


def _invert(attack: str, view, observed: torch.Tensor, victims: torch.Tensor, cfg: AttackConfig,
            seed: int) -> tuple[dict, torch.Tensor]:
    """One attack on the observed features: its metrics (with intervals and seconds) and the reconstructions."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if attack == "decoder":
        recon = decoder_inversion(view, observed, cfg)
        result = _with_intervals(reconstruction_metrics(recon.cpu(), victims), recon.cpu(), victims)
    else:
        per_mode, recons = {}, {}
        for mode in attacker_modes(view):
            torch.manual_seed(seed)
            recons[mode] = optimization_inversion(view, observed, mode, cfg).cpu()
            per_mode[mode] = reconstruction_metrics(recons[mode], victims)
        best = max(per_mode, key=lambda m: per_mode[m]["psnr"]["mean"])
        recon = recons[best]
        result = _with_intervals(dict(per_mode[best], mode=best, per_mode=per_mode), recon, victims)
    result["seconds"] = time.perf_counter() - t0
    return result, recon


def evaluate_privacy(runs: list[Run], aux: torch.Tensor, victims: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     blocks: str, attacks: list[str], sigmas: list[float], cfg: AttackConfig, passes: int = 5,
                     seed: int = 0, partial: _Partial | None = None, precision: str = "fp32",
                     batch_size: int = 512, device: str | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One entry per (run, k, defence): accuracy and attack metrics. Also returns the shown reconstructions by label.

    `precision` and `batch_size` are those of the victim model's forward passes (the devices' features, the split
    accuracy, the white-box inversion); the attacker's decoder trains in fp32. Configurations found in `partial` are
    reused; each newly finished one is added to it. `device`: where the models and the attacks run (None: cuda when
    available)."""
    where = resolve_device(device)
    victims_dev = victims.to(where)
    entries, shown = [], {}
    clean_accuracy: dict[int, dict] = {}
    for i, run, model, k, sigma in tqdm(_plan(runs, blocks, sigmas, where), desc="privacy", unit="config"):
        key = _Partial.key(run, k, sigma)
        if partial is not None and (hit := partial.get(key)) is not None:
            entries.append(hit[0])
            shown.update(hit[1])
            if sigma == 0:
                clean_accuracy[i] = hit[0]["accuracy"]
            continue
        noise_std = sigma * feature_rms(model, aux[:1024].to(where), k, precision, batch_size) if sigma else 0.0
        if sigma == 0 and i in clean_accuracy:  # without noise the split does not change the model's predictions
            accuracy = clean_accuracy[i]
        else:
            accuracy = split_accuracy(model, test_x.to(where), test_y, k, noise_std, passes, seed=seed + 17,
                                      batch_size=batch_size, precision=precision)
            if sigma == 0:
                clean_accuracy[i] = accuracy
        observed = Device(model, k, noise_std, seed + 1, precision).transmit(victims_dev, batch_size)  # the victim's
        view = attacker_view(model, k, aux.to(where), noise_std, white_box=True, seed=seed + 2, precision=precision,
                             batch_size=batch_size)  # the attacker's share
        entry = dict(run=str(run.path), name=run.name, kind=_run_kind(run), block=k, defence="noise" if sigma else "none",
                     sigma=sigma, noise_std=noise_std, accuracy=accuracy, attacks={})
        label = f"{run.name} k={k}" + (f" noise {sigma:g}" if sigma else "")
        for attack in attacks:
            entry["attacks"][attack], recon = _invert(attack, view, observed, victims, cfg, seed)
            shown[f"{label} {attack}"] = recon[:SHOW].cpu()
        entries.append(entry)
        if partial is not None:
            partial.add(key, entry, {f"{label} {attack}": shown[f"{label} {attack}"] for attack in attacks})
        tqdm.write(f"{label}: accuracy {accuracy['mean']:.3f}  " + "  ".join(
            f"{a} PSNR {r['psnr']['mean']:.1f} SSIM {r['ssim']['mean']:.3f}" for a, r in entry["attacks"].items()))
    return entries, shown


def matched_utility(entries: list[dict], attacks: list[str]) -> list[dict]:
    """Leakage of each stochastic run against the noise curve of each deterministic run, interpolated at equal accuracy.

    The noise curve is (accuracy, PSNR/SSIM) over sigma = 0 and the noise levels; outside its accuracy range
    there is no matched point, and the entry says on which side it fell.
    """
    out = []
    for s in (e for e in entries if e["kind"] == "stochastic"):
        dets = {e["run"] for e in entries if e["kind"] == "deterministic" and e["block"] == s["block"]}
        for det in sorted(dets):
            same = (e for e in entries if e["run"] == det and e["block"] == s["block"])
            curve = sorted(same, key=lambda e: e["accuracy"]["mean"])
            acc = np.array([e["accuracy"]["mean"] for e in curve])
            for attack in attacks:
                row = dict(block=s["block"], attack=attack, stochastic=s["name"], deterministic=curve[0]["name"],
                           stochastic_accuracy=s["accuracy"]["mean"], noise_accuracy_range=[float(acc.min()), float(acc.max())])
                inside = acc.min() <= row["stochastic_accuracy"] <= acc.max()
                # np.interp's weight of each noise level at the stochastic accuracy: applied image by image below
                weights = np.array([np.interp(row["stochastic_accuracy"], acc, np.eye(len(curve))[j]) for j in range(len(curve))])
                for metric in ("psnr", "ssim"):
                    row[f"stochastic_{metric}"] = s["attacks"][attack][metric]["mean"]
                    values = np.array([e["attacks"][attack][metric]["mean"] for e in curve])
                    matched = float(np.interp(row["stochastic_accuracy"], acc, values)) if inside else None
                    row[f"noise_{metric}_at_matched_accuracy"] = matched
                    mine = s["attacks"][attack].get("per_image", {}).get(metric)
                    theirs = [e["attacks"][attack].get("per_image", {}).get(metric) for e in curve]
                    if inside and mine is not None and all(t is not None for t in theirs):
                        noise = weights @ np.array(theirs)  # per victim: the noise curve at the matched accuracy
                        # leakage: a lower attack PSNR/SSIM is better for the defender ("better" = leaks less)
                        c = compare([Scores.per_image(mine)], [Scores.per_image(noise)], metric, f"{s['name']} (stochastic)",
                                    f"{curve[0]['name']} + noise at matched accuracy", higher_is_better=False, n_boot=N_BOOT)
                        row[f"{metric}_comparison"] = c.as_dict()
                if row["noise_psnr_at_matched_accuracy"] is None:
                    side = "above" if row["stochastic_accuracy"] > acc.max() else "below"
                    row["verdict"] = f"no match: stochastic accuracy is {side} the noise curve's range"
                else:
                    gap = row["stochastic_psnr"] - row["noise_psnr_at_matched_accuracy"]
                    row["psnr_gap_db"] = gap
                    if "psnr_comparison" in row:  # the verdict of the paired PSNR interval, never of the point gap
                        c = row["psnr_comparison"]
                        row["verdict"] = {"better": "stochastic leaks less", "worse": "stochastic leaks more"}.get(
                            c["verdict"], c["verdict_text"])
                    else:  # entries resumed from before per-image values were kept: the point estimate only
                        row["verdict"] = ("stochastic leaks less" if gap < 0 else "stochastic leaks more") + " (no interval)"
                out.append(row)
    return out


def _fmt(m: dict, ci: list[float] | None = None) -> str:
    d = 3 if abs(m["mean"]) < 2 else 2
    return f"{m['mean']:.{d}f} ± {m['std']:.{d}f}" + ("" if ci is None else f" [{ci[0]:.{d}f}, {ci[1]:.{d}f}]")


def _diff(c: dict | None, d: int) -> str:
    return "—" if c is None else f"{c['difference']:+.{d}f} [{c['low']:+.{d}f}, {c['high']:+.{d}f}]"


def markdown(result: dict) -> str:
    attacks = result["settings"]["attacks"]
    head = ["run", "kind", "block k", "defence", "accuracy"] + [f"{a} {m}" for a in attacks for m in ("PSNR (dB)", "SSIM")]
    lines = [f"# Feature privacy: {', '.join(r['name'] for r in result['runs'])} on {result['data']}", "",
             f"{result['settings']['n_victims']} victim test images, {result['settings']['n_aux']} auxiliary training images; "
             "PSNR/SSIM mean ± std over victims [95% interval: percentile bootstrap over the victims] (higher = more "
             "leakage); accuracy = single pass on the test split, mean ± std over passes.", "",
             *([f"Test split (victims, accuracy): {result['test_source']}.", ""] if result.get("test_source") else []),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in result["entries"]:
        defence = "none" if e["defence"] == "none" else f"noise σ={e['sigma']:g}×RMS"
        cells = [e["name"], e["kind"], str(e["block"]), defence, _fmt(e["accuracy"])]
        for a in attacks:
            r = e["attacks"][a]
            mode = f" ({r['mode']})" if "mode" in r else ""
            ci = r.get("ci", {})
            cells += [_fmt(r["psnr"], ci.get("psnr")) + mode, _fmt(r["ssim"], ci.get("ssim"))]
        lines.append("| " + " | ".join(cells) + " |")
    if result["matched_utility"]:
        lines += ["", "## At matched accuracy: stochastic run vs deterministic run + feature noise", "",
                  "Differences are stochastic - noise on the same victims, 95% CI from a paired bootstrap over the victims "
                  f"({N_BOOT} resamples; the noise side interpolated per victim between noise levels). The verdict rests on "
                  "the PSNR interval; the accuracy match itself is taken as exact.", "",
                  "| block k | attack | stochastic acc | stochastic PSNR | noise PSNR at same acc | PSNR diff [95% CI] | "
                  "stochastic SSIM | noise SSIM at same acc | SSIM diff [95% CI] | verdict |", "|---" * 10 + "|"]
        for r in result["matched_utility"]:
            def num(v, f): return "—" if v is None else format(v, f)
            lines.append(f"| {r['block']} | {r['attack']} | {r['stochastic_accuracy']:.3f} | {r['stochastic_psnr']:.2f} | "
                         f"{num(r['noise_psnr_at_matched_accuracy'], '.2f')} | {_diff(r.get('psnr_comparison'), 2)} | "
                         f"{r['stochastic_ssim']:.3f} | {num(r['noise_ssim_at_matched_accuracy'], '.3f')} | "
                         f"{_diff(r.get('ssim_comparison'), 3)} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def grid_figure(originals: torch.Tensor, shown: dict[str, torch.Tensor]):
    """One row per attack and setting under the originals; the figure is as wide as its longest row label needs."""
    from torchvision.utils import make_grid

    from ..runs import pyplot

    plt = pyplot()
    rows = {"original": originals[:SHOW], **shown}
    label_inches = 0.07 * max(len(label) for label in rows) + 0.3  # 8-point text: ~0.07 in a character
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * SHOW + label_inches + 0.3, 0.95 * len(rows) + 0.3), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        grid = make_grid(images.float().clamp(0, 1), nrow=len(images), padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def plot_grid(originals: torch.Tensor, shown: dict[str, torch.Tensor], path: Path) -> None:
    _save_figure(grid_figure(originals, shown), path)


def privacy_utility_figure(entries: list[dict], attacks: list[str]):
    """Attack PSNR/SSIM against accuracy per split point. Colour: run; line and marker: attack (a stochastic run's
    single point per attack as a large star for the decoder, a large cross for optimisation)."""
    from ..runs import pyplot

    plt = pyplot()

    blocks = sorted({e["block"] for e in entries})
    names = list(dict.fromkeys(e["name"] for e in entries))
    colours = {n: f"C{i}" for i, n in enumerate(names)}
    styles = {"decoder": ("-", "o", "*"), "optimization": ("--", "s", "X")}  # line, marker, stochastic run's marker
    fig, axes = plt.subplots(2, len(blocks), figsize=(4.2 * len(blocks), 7), squeeze=False)
    for col, k in enumerate(blocks):
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row, col]
            for name in names:
                points = sorted((e for e in entries if e["name"] == name and e["block"] == k), key=lambda e: e["sigma"])
                for attack in attacks:
                    ls, marker, random_marker = styles[attack]
                    x = [e["accuracy"]["mean"] for e in points]
                    y = [e["attacks"][attack][metric]["mean"] for e in points]
                    kind = points[0]["kind"]
                    cis = [e["attacks"][attack].get("ci", {}).get(metric) for e in points]
                    err = None if None in cis else [[v - c[0] for v, c in zip(y, cis)], [c[1] - v for v, c in zip(y, cis)]]
                    ax.errorbar(x, y, yerr=err, ls=ls, marker=random_marker if kind == "stochastic" else marker,
                                ms={"*": 13, "X": 9}[random_marker] if kind == "stochastic" else 5, capsize=3,
                                elinewidth=0.8, color=colours[name],
                                label=f"{name} ({kind}) {attack}")
                    for e, xi, yi in zip(points, x, y):
                        if e["sigma"] and attack == attacks[0]:  # the other attack's point at this accuracy: same sigma
                            ax.annotate(f"σ={e['sigma']:g}", (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
            ax.set_xlabel("accuracy (single pass)")
            ax.set_ylabel(f"attack {metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
            ax.set_title(f"split after block {k}")
            ax.locator_params(axis="x", nbins=5)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()  # below the panels: inside, it hid points
    rows = math.ceil(len(labels) / 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    has_ci = any("ci" in a for e in entries for a in e["attacks"].values())  # reports before the intervals have none
    fig.suptitle("privacy vs utility (lower leakage and higher accuracy = better: bottom right)\n"
                 + ("bars: 95% bootstrap intervals of the attack's PSNR/SSIM over the victims" if has_ci else
                    "no intervals in this report (rerun the suite for them)"), fontsize=10)
    fig.tight_layout(rect=(0, (0.25 * rows + 0.1) / fig.get_figheight(), 1, 1))
    return fig


def plot_privacy_utility(entries: list[dict], attacks: list[str], path: Path) -> None:
    _save_figure(privacy_utility_figure(entries, attacks), path)


def replot(out: Path) -> list[Path]:
    """Redraw privacy_utility.png from the saved privacy.json (no attack reruns); reconstructions.png needs the images."""
    out = Path(out)
    result = read_json(out / "privacy.json", "the privacy report to redraw")
    plot_privacy_utility(result["entries"], result["settings"]["attacks"], out / "privacy_utility.png")
    return [out / "privacy_utility.png"]


def validate(s: Settings) -> None:
    """Refuse settings the attacks cannot run with, naming the setting."""
    for name in ("n_victims", "samples", "batch_size"):
        if getattr(s, name) < 1:
            raise UserError(f"{name}={getattr(s, name)} must be >= 1")
    unknown = [a for a in s.attacks if a not in ATTACKS]
    if unknown or not s.attacks:
        raise UserError(f"attacks={list(s.attacks)}: expected a non-empty subset of {', '.join(ATTACKS)}")
    if s.precision not in PRECISIONS:
        raise UserError(f"precision={s.precision!r} is not one of {', '.join(PRECISIONS)}")
    if any(v <= 0 for v in s.noise_baseline):
        raise UserError(f"noise_baseline={list(s.noise_baseline)}: noise levels must be > 0")


@dataclass
class PrivacyResult(Result):
    """`out`: the report folder; `report`: what its privacy.json holds."""

    report: dict


def run(s: Settings) -> PrivacyResult:
    """The suite from its settings (what `stochvit privacy` does), written into `s.out` (default FIRST_RUN_DIR/privacy)."""
    validate(s)
    resolve_device(s.device)  # a device this machine lacks: refused before anything loads
    runs = [load_run(p) for p in s.run_dirs]
    data = data_for(runs[0].config, s.data, s.data_dir)
    for r in runs:
        check_compatible(r.config, data)
    gen = torch.Generator().manual_seed(s.seed)
    aux, _ = data.train.tensors()
    if s.aux_limit is not None and s.aux_limit < len(aux):
        aux = aux[torch.randperm(len(aux), generator=gen)[: s.aux_limit]]
    test_x, test_y = data.test.tensors()
    victims = test_x[torch.randperm(len(test_x), generator=gen)[: s.n_victims]]
    if not any(not is_random(r.model) for r in runs) and s.noise_baseline:
        print("note: the noise baseline is applied to deterministic runs only; pass the deterministic run as well to get it")
    cfg = s.attack
    settings = dict(blocks=s.split_blocks, attacks=list(s.attacks), noise_baseline=list(s.noise_baseline),
                    n_victims=len(victims), n_aux=len(aux), passes=s.samples, seed=s.seed, victims="test split",
                    aux="train split", attack_config=asdict(cfg), precision=s.precision, batch_size=s.batch_size)
    for r in runs:  # a bad split_blocks must fail before the resume folder exists
        parse_blocks(s.split_blocks, depth(r.model))
    out = Path(s.out) if s.out else runs[0].path / "privacy"
    record = json.loads(json.dumps(dict(settings, data=data.name, runs=[str(r.path) for r in runs]), default=float))
    check_output_dir(out, record, "privacy.json", s.overwrite)
    partial = _Partial(out, record)
    t0 = time.perf_counter()
    entries, shown = evaluate_privacy(runs, aux, victims, test_x, test_y, s.split_blocks, list(s.attacks),
                                      list(s.noise_baseline), cfg, s.samples, s.seed, partial, s.precision, s.batch_size,
                                      s.device)
    result = dict(
        data=data.name, test_source=data.test_source(),
        runs=[dict(run=str(r.path), name=r.name, kind=_run_kind(r)) for r in runs], settings=settings,
        entries=entries, matched_utility=matched_utility(entries, list(s.attacks)), seconds=time.perf_counter() - t0,
    )
    with atomic_output_dir(out, record, "privacy.json", s.overwrite) as tmp:
        plot_grid(victims, shown, tmp / "reconstructions.png")
        plot_privacy_utility(entries, list(s.attacks), tmp / "privacy_utility.png")
        atomic_write_bytes(tmp / "privacy.md", markdown(result).encode())
        write_json(tmp / "privacy.json", result)
    partial.clear()
    return PrivacyResult(out, result)
