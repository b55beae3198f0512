"""Plots a person reads at a glance: properties checked on the matplotlib figures, not on pixels."""

from __future__ import annotations

from pathlib import Path

import pytest

from stochvit.runs import Curves


def _row(epoch: int, **values) -> dict:
    return dict(epoch=epoch, train_loss=2.3 - epoch / 10, train_accuracy=0.1 + epoch / 10, val_nll=2.2 - epoch / 10,
                val_accuracy=0.2 + epoch / 10, val_ece=0.05, **values)


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_curves_of_a_one_epoch_run_draw_markers_and_their_values(tmp_path):
    curves = Curves(tmp_path)
    curves.append(_row(0))
    fig = curves.figure()
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["loss / NLL", "accuracy", "ECE (val)"]
    for ax, labels in zip(axes, (["train", "val"], ["train", "val"], ["val"])):
        lines = _lines(ax)
        assert sorted(lines) == labels
        for line in lines.values():
            assert len(line.get_xdata()) == 1 and line.get_marker() not in ("None", "", None)  # a lone point shows
        assert {t.get_text() for t in ax.texts} == {f"{line.get_ydata()[0]:.3f}" for line in lines.values()}
        assert list(ax.get_xticks()) == [0]  # one integer tick, not -0.04 .. 0.04
    assert _lines(axes[0])["val"].get_color() == _lines(axes[2])["val"].get_color()  # val is one colour everywhere
    curves.plot()
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_curves_of_a_longer_run_keep_integer_epochs_without_labels(tmp_path):
    curves = Curves(tmp_path)
    for e in range(6):
        curves.append(_row(e))
    fig = curves.figure()
    for ax in fig.axes:
        assert not ax.texts and all(float(t).is_integer() for t in ax.get_xticks()) and ax.get_xlabel() == "epoch"
        assert all(len(line.get_xdata()) == 6 for line in ax.get_lines())


def test_curves_of_a_federated_run_count_rounds_from_one(tmp_path):
    curves = Curves(tmp_path)
    for e in range(3):
        curves.append(_row(e, round=e + 1))
    fig = curves.figure()
    for ax in fig.axes:
        assert ax.get_xlabel() == "round" and all(list(line.get_xdata()) == [1, 2, 3] for line in ax.get_lines())


def _entry(name: str, kind: str, block: int, sigma: float, acc: float, psnr: float) -> dict:
    attack = lambda p: dict(psnr=dict(mean=p), ssim=dict(mean=p / 40), ci=dict(psnr=[p - 1, p + 1], ssim=[p / 41, p / 39]))  # noqa: E731
    return dict(name=name, kind=kind, block=block, sigma=sigma, accuracy=dict(mean=acc),
                attacks=dict(decoder=attack(psnr), optimization=attack(psnr + 3)))


def test_privacy_utility_tells_every_run_and_attack_apart():
    from stochvit.suites.privacy import privacy_utility_figure

    entries = [_entry("stoch", "stochastic", 1, 0.0, 0.8, 20)] + [
        _entry("det", "deterministic", 1, s, a, p) for s, a, p in ((0.0, 0.9, 30), (0.3, 0.85, 25), (1.0, 0.6, 18))]
    fig = privacy_utility_figure(entries, ["decoder", "optimization"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["stoch (stochastic) decoder", "stoch (stochastic) optimization", "det (deterministic) decoder",
                      "det (deterministic) optimization"]
    for ax in fig.axes:  # each panel: one errorbar line per (run, attack), each drawn its own way
        lines = {c.get_label(): c.lines[0] for c in ax.containers}
        assert list(lines) == labels
        styles = [(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines.values()]
        assert len(set(styles)) == 4, styles
        assert lines[labels[0]].get_marker() != lines[labels[1]].get_marker()  # the stochastic run's: was '*' for both
    assert not fig.axes[0].get_legend()  # the legend sits below the panels, not over the points


def test_reconstruction_rows_keep_their_whole_labels():
    import torch

    from stochvit.suites.privacy import SHOW, grid_figure

    images = torch.rand(SHOW, 1, 8, 8)
    shown = {f"stoch-u0.5-1.5-a-long-run-name k={k} noise 0.3 optimization": images for k in (1, 12)}
    fig = grid_figure(images, shown)
    fig.canvas.draw()
    box = fig.bbox
    for ax in fig.axes:
        extent = ax.yaxis.label.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (ax.yaxis.label.get_text(), extent, box)


def _robust_result(attacks: dict[str, list[float]], all_pass: list[float] | None = None) -> dict:
    labels = ["1/255", "4/255", "8/255"]
    worst = [min(v[i] for v in attacks.values()) for i in range(3)]
    return dict(run="/runs/stochastic", norm="linf", clean=dict(mean=0.5),
                attacks={n: {lb: dict(mean=v[i]) for i, lb in enumerate(labels)} for n, v in attacks.items()},
                worst_case={lb: dict(eps=e, mean=worst[i], all_pass=(all_pass or worst)[i])
                            for i, (lb, e) in enumerate(zip(labels, (1 / 255, 4 / 255, 8 / 255)))})


def test_robust_accuracy_says_when_lines_coincide():
    from stochvit.suites.robustness import figure

    fig = figure(_robust_result({"pgd": [0.3, 0.1, 0.0], "eot-pgd": [0.3, 0.1, 0.0], "square": [0.4, 0.3, 0.2],
                                 "apgd-ce": [0.305, 0.098, 0.0]}))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pgd = eot-pgd" in labels and "worst case (mean = all-pass)" in labels  # identical: drawn once, said so
    assert "pgd" not in labels and "eot-pgd" not in labels and "worst case (all-pass)" not in labels
    assert "identical robust accuracy" in ax.get_title()
    assert "pgd = eot-pgd, apgd-ce: within 0.01 at every epsilon" in ax.get_title()  # near-identical: named
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    assert len({line.get_marker() for line in lines.values()}) == len(lines) == 3  # own marker each
    assert len({tuple(line.get_xdata()) for line in lines.values()}) == 3  # nudged apart on the x axis

    fig = figure(_robust_result({"pgd": [0.3, 0.1, 0.0], "square": [0.4, 0.3, 0.2]}, all_pass=[0.25, 0.05, 0.0]))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"pgd", "square", "worst case (mean)", "worst case (all-pass)"} <= set(labels)
    assert ax.get_title() == "stochastic"  # nothing coincides: nothing to say


def test_reliability_histogram_lines_have_a_legend():
    import torch

    from stochvit.suites.calibration import Method, reliability_figure

    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(1, 300, 10, generator=g) * 2).softmax(-1)
    labels = torch.randint(0, 10, (300,), generator=g)
    fig = reliability_figure([Method("a", [], probs, probs), Method("b", [], probs, probs)], labels)
    top, bottom = fig.axes[0], fig.axes[1]  # the first method's diagram and its confidence histogram
    red = [line for line in bottom.get_lines() if line.get_color() == "tab:red"]
    assert len(red) == 1 and red[0].get_xdata()[0] == pytest.approx(probs[0].max(1).values.mean().item())
    legend = bottom.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["mean confidence", "accuracy"]
    assert "gap to mean confidence" in [t.get_text() for t in top.get_legend().get_texts()]


def test_curves_with_sparse_validation_share_one_epoch_axis(tmp_path):
    curves = Curves(tmp_path)  # --val-every 5 over 5 epochs: validation only after the last one
    for e in range(5):
        row = _row(e)
        curves.append(row if e == 4 else {k: v for k, v in row.items() if not k.startswith("val_")})
    fig = curves.figure()
    assert len({ax.get_xlim() for ax in fig.axes}) == 1 and fig.axes[2].get_xlim()[0] < 0  # ECE keeps epochs 0-4
    for ax in fig.axes:
        (text,) = [t for t in ax.texts if t.get_color() == _lines(ax)["val"].get_color()]
        assert text.get_ha() == "right"  # the lone val point is at the right edge: its value written on its left


def test_calibration_replot_redraws_shift_plots_from_the_saved_report(tmp_path):
    import json
    import shutil

    from stochvit.suites.calibration import _clean, _int_keys, replot

    report = {"severities": [1, 2], "methods": {"a": {"shift_mean": {0: {"x": 1.0}, 2: {"x": float("nan")}}}}}
    assert _int_keys(json.loads(json.dumps(_clean(report))))["methods"]["a"]["shift_mean"].keys() == {0, 2}
    saved = Path(__file__).resolve().parents[1] / "benchmarks/runs/cifar10-full/calibration/calibration.json"
    shutil.copy(saved, tmp_path / "calibration.json")  # a committed report from before the intervals
    assert replot(tmp_path) == [tmp_path / "shift.png", tmp_path / "shift_by_corruption.png"]
    assert all((tmp_path / n).stat().st_size > 0 for n in ("shift.png", "shift_by_corruption.png"))
    assert not (tmp_path / "metrics.png").exists()  # its error bars need the intervals this report lacks


def test_robust_accuracy_at_one_epsilon_marks_the_worst_case(tmp_path):
    from stochvit.runs import write_json
    from stochvit.suites.robustness import figure, replot

    result = _robust_result({"pgd": [0.3, 0.2, 0.1]}, all_pass=[0.25, 0.15, 0.05])  # kept: 8/255 alone
    result["worst_case"] = {"8/255": result["worst_case"]["8/255"]}
    result["attacks"] = {n: {"8/255": v["8/255"]} for n, v in result["attacks"].items()}
    worst = [line for line in figure(result).axes[0].get_lines() if line.get_label().startswith("worst case")]
    assert len(worst) == 2 and len({line.get_marker() for line in worst}) == 2  # a lone point per rule, each its own
    assert all(line.get_marker() not in ("None", "", None) for line in worst)
    write_json(tmp_path / "robustness.json", result)
    assert replot(tmp_path) == [tmp_path / "robust_accuracy.png"] and (tmp_path / "robust_accuracy.png").stat().st_size


def test_privacy_utility_names_sigma_once_and_claims_intervals_only_when_drawn(tmp_path):
    from stochvit.runs import write_json
    from stochvit.suites.privacy import privacy_utility_figure, replot

    entries = [_entry("det", "deterministic", 1, s, a, p) for s, a, p in ((0.0, 0.9, 30), (0.3, 0.85, 25), (1.0, 0.6, 18))]
    fig = privacy_utility_figure(entries, ["decoder", "optimization"])
    assert "bars: 95% bootstrap intervals" in fig._suptitle.get_text()
    assert all(sorted(t.get_text() for t in ax.texts) == ["σ=0.3", "σ=1"] for ax in fig.axes)  # once per sigma
    for e in entries:
        for a in e["attacks"].values():
            del a["ci"]
    assert "no intervals" in privacy_utility_figure(entries, ["decoder", "optimization"])._suptitle.get_text()
    write_json(tmp_path / "privacy.json", dict(entries=entries, settings=dict(attacks=["decoder", "optimization"])))
    assert replot(tmp_path) == [tmp_path / "privacy_utility.png"] and (tmp_path / "privacy_utility.png").stat().st_size


def test_adversarial_examples_show_several_classes_of_a_class_sorted_split():
    import torch

    from stochvit.suites.robustness import grid_examples

    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 5)  # the first six examples are all class 0
    ids = grid_examples(y)
    assert ids.tolist() == [0, 1, 2, 3, 10, 13] and set(y[ids].tolist()) == {0, 1, 2}
    assert grid_examples(torch.tensor([3, 3])).tolist() == [0, 1]  # fewer examples than the grid: all of them
    assert grid_examples(torch.arange(9)).tolist() == list(range(6))  # more classes than rows: the first six
