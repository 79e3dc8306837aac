"""atomic.py: a file is replaced whole or not at all, and an interrupted write leaves nothing behind."""

import os

import pytest

from mosa_retrofit import atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old")
    atomic.write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    atomic.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


@pytest.mark.parametrize("write", ["text", "figure"])
def test_an_interrupted_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, write):
    path = tmp_path / ("table.md" if write == "text" else "plot.png")
    path.write_bytes(b"old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if write == "text":
            atomic.write_atomic(path, "new")
        else:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.plot([0, 1])
            atomic.savefig_atomic(fig, path)
            plt.close(fig)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_figure_keeps_its_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    atomic.savefig_atomic(fig, tmp_path / "plot.png")
    atomic.savefig_atomic(fig, tmp_path / "plot.svg")
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:500]
