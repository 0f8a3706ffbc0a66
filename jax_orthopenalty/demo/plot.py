"""Part 4: the task loss and the orthogonality error over the steps, as a PNG."""

from __future__ import annotations

from typing import Any

import numpy as np

from .training import History

MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so no plot was written "
    '(pip install "jax_orthopenalty[demo]" brings it).'
)

_STYLES: dict[str, dict[str, Any]] = {
    "no penalty": {"color": "0.5", "linestyle": "--"},
    '"positive"': {"linestyle": (0, (5, 2))},
    '"negative"': {"linestyle": ":"},
}


def write_plot(path: str, histories: list[History], title: str) -> bool:
    """Writes the two-panel PNG; returns False if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend: no display, no global pyplot state
    ax_task, ax_err = fig.subplots(1, 2)
    for h in histories:
        style = _STYLES.get(h.label, {})
        steps = np.arange(1, h.task.size + 1)
        ax_task.plot(steps, h.task, label=h.label, linewidth=1.4, **style)
        ax_err.plot(steps, h.error, label=h.label, linewidth=1.4, **style)
    ax_task.set(
        yscale="log", xlabel="step", ylabel="reconstruction loss (task)", title="Task loss"
    )
    ax_err.set(
        yscale="log",
        xlabel="step",
        ylabel=r"$\max_i\,\max_{jk} |\Phi_i^\top\Phi_i - I|$",
        title="Orthogonality error",
    )
    for ax in (ax_task, ax_err):
        ax.grid(True, which="major", alpha=0.3)
    ax_err.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return True
