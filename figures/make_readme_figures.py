"""Regenerate the README's figures from a demo run.

    python figures/make_readme_figures.py [RUN]      # default RUN: runs/demo (made with `landscape demo`)

If RUN does not exist, the demo is run first (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from landscape import plots  # noqa: E402
from landscape.store import load_run  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(run_dir: str = "runs/demo") -> None:
    run_path = Path(run_dir)
    if not (run_path / "run.sqlite").exists():
        from landscape.demo import run_demo

        run_demo(run_path)
    run = load_run(run_path)
    with plots.paper_style():
        for name, draw, width in [
            ("sharpness_ratio", lambda ax: plots.sharpness_ratio(run, ax=ax), 6.8),
            ("landscape_lines", lambda ax: plots.landscape_lines(run, ax=ax), 6.8),
            ("update_histograms", lambda ax: plots.update_histograms(run, ax=ax, directions=plots._fig1_directions(run)), 3.4),
        ]:
            fig, ax = plt.subplots(figsize=(width, 3.0), constrained_layout=True)
            draw(ax)
            fig.savefig(HERE / f"{name}.png", dpi=150)
            plt.close(fig)
            print(HERE / f"{name}.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
