"""Plots a person reads at a glance: properties checked on the matplotlib figures, not on pixels."""

from __future__ import annotations

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
        assert not ax.texts and all(float(t).is_integer() for t in ax.get_xticks())
        assert all(len(line.get_xdata()) == 6 for line in ax.get_lines())
