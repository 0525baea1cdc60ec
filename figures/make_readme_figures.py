"""Regenerate the README's figures from a demo run, with today's code.

    python figures/make_readme_figures.py [RUN]      # default RUN: runs/demo (made with `landscape demo`)

If RUN does not exist, the demo is run first (about a minute on 2 CPU cores). The figures are the
ones `landscape plot RUN` writes (same functions, same defaults), at 150 dpi, each with its one-line
caption beside it (``NAME.txt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from landscape import plots  # noqa: E402
from landscape.store import load_run  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURES = ("sharpness_ratio", "landscape_lines", "update_histograms")


def main(run_dir: str = "runs/demo") -> None:
    run_path = Path(run_dir)
    if not (run_path / "run.sqlite").exists():
        from landscape.demo import run_demo

        run_demo(run_path)
    for path in plots.save_figures(load_run(run_path), HERE, "png", only=FIGURES, dpi=150):
        print(path)


if __name__ == "__main__":
    main(*sys.argv[1:])
