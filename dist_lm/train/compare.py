"""Compare runs: a table of what differs between them and how they did, and their loss curves against tokens.

Runs come from an MLflow experiment or from runs/*/metrics.jsonl (dist_lm.train.compare_sources: status, merged
attempts of a resumed run, names made distinct); this module only shows them.

Design decisions:
- The x-axis is tokens trained by all processes, not steps: a run on 2 processes trains on twice the tokens per
  step, and against steps would look twice as fast as it is. Steps on request (`x="steps"`).
- Linear x, unless the runs' last points differ by more than 10x: every run starts at step 1, so one run alone
  always spans more than two decades and a span rule would always pick log; a log axis would then give the first
  few percent of training half the width, where the loss falls from ln(vocab) for every run alike, and squeeze the
  end, where runs differ. Only runs of very different lengths need it, so that the short one is not a sliver.
- The y-axis starts at the lowest loss and stops above the highest val loss (or the train loss at a tenth of the
  way, if higher): the first steps' ln(vocab) would otherwise take most of the height.
- Train loss is a line, val loss markers, one colour per run, one legend entry per run (its status and val
  losses in it); a run whose tokens are estimated says so in the legend and the table.
- The table shows only the params that differ (the rest is noise), then final train loss, final and best val
  loss, tokens/s (median over log intervals), tokens trained, and MFU when logged.
- A matplotlib Figure on the Agg canvas, not pyplot, written to a file: works on headless machines, and
  loss_figure hands the figure itself to a caller (a notebook, a test that reads its legend).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dist_lm.errors import UserError
from dist_lm.train.compare_sources import IDENTITY_PARAMS, RunRecord, collect_runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["collect_runs", "differing_params", "format_table", "loss_figure", "plot_losses", "plot_series", "use_log_x"]

AXES = ("tokens", "steps")
LOG_X_RATIO = 10  # last x of the longest run / of the shortest, above which the x-axis is log-scaled


def differing_params(runs: list[RunRecord]) -> list[str]:
    """Param keys whose values are not the same in every run (the run's name and directory aside)."""
    keys = sorted({k for r in runs for k in r.params if k not in IDENTITY_PARAMS})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def format_table(runs: list[RunRecord]) -> str:
    """A plain-text table: run, status, differing params, final losses, best val loss, tokens/s, tokens trained."""
    params = differing_params(runs)
    header = ["run", "status", *params, "train loss", "val loss", "best val (step)", "tokens/s", "tokens trained"]
    with_mfu = any(r.mfu is not None for r in runs)
    header += ["mfu"] * with_mfu
    rows = [[r.name, r.status, *(r.params.get(p, "") for p in params), *_result_cells(r, with_mfu)] for r in runs]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def _result_cells(r: RunRecord, with_mfu: bool) -> list[str]:
    loss = lambda v: "" if v is None else f"{v:.4f}"
    best = f"{r.best_val[1]:.4f} ({r.best_val[0]})" if r.best_val else ""
    tokens = "" if r.tokens_trained is None else f"{r.tokens_trained:,.0f}" + (" (estimated)" * r.tokens_estimated)
    speed = "" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
    cells = [loss(r.final_train_loss), loss(r.final_val_loss), best, speed, tokens]
    return cells + (["" if r.mfu is None else f"{r.mfu:.1%}"] if with_mfu else [])


def plot_series(runs: list[RunRecord], x: str = "tokens") -> tuple[str, list[tuple[RunRecord, tuple, tuple]]]:
    """What the plot draws: the axis actually used and, per run drawn, (run, (x, train loss), (x, val loss)).
    On the tokens axis a run without tokens is left out; if no run has them, the axis is steps."""
    if x not in AXES:
        raise UserError(f"cannot plot against {x!r}; use one of {', '.join(AXES)}")
    if x == "tokens" and not any(r.train.tokens for r in runs):
        x = "steps"
    xs = (lambda c: c.steps) if x == "steps" else (lambda c: c.tokens)
    drawn = [(r, (xs(r.train), r.train.values), (xs(r.val), r.val.values)) for r in runs
             if x == "steps" or (r.train.tokens is not None and r.val.tokens is not None)]
    return x, drawn


def plot_losses(runs: list[RunRecord], path: str | Path, x: str = "tokens",
                say: Callable[[str], None] | None = None) -> Path:
    """Write loss_figure(runs, x) to `path` (its suffix picks the format: .png, .svg, .pdf, ...)."""
    path = Path(path)
    formats = _canvas(_figure()).get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"cannot write a plot to {str(path)!r}: the suffix picks the format; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    loss_figure(runs, x, say).savefig(path, dpi=120, bbox_inches="tight")
    return path


def loss_figure(runs: list[RunRecord], x: str = "tokens", say: Callable[[str], None] | None = None) -> Figure:
    """Train (line) and val (markers) loss of every run against tokens (or steps); `say` tells of runs left out
    or a change of axis, in one line each."""
    say = say or (lambda line: print(line, file=sys.stderr))
    fig = _figure()
    ax = fig.add_subplot()
    axis, drawn = plot_series(runs, x)
    _say_left_out(runs, drawn, x, axis, say)
    for i, (r, (tx, ty), (vx, vy)) in enumerate(drawn):
        color = f"C{i % 10}"
        ax.plot(tx, ty, color=color, linewidth=1.2, label=_legend_label(r))
        ax.plot(vx, vy, color=color, linestyle="none", marker="o", markersize=5, markeredgecolor="black",
                markeredgewidth=0.5)
    _style_axes(ax, axis, drawn)
    return fig


def _figure() -> Figure:
    # A Figure with its own Agg canvas, not pyplot's: no global state, no display needed, nothing to close.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5))
    _canvas(fig)
    return fig


def _canvas(fig: Figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return FigureCanvasAgg(fig)


def _say_left_out(runs: list[RunRecord], drawn: list, x: str, axis: str, say: Callable[[str], None]) -> None:
    if axis != x:
        say("no run logged train/tokens or the params to estimate them (global_batch_size, model.seq_len): "
            "plotting against steps")
    shown = {id(r) for r, *_ in drawn}
    left = [r.name for r in runs if id(r) not in shown]
    if left:
        say(f"left out of the plot against tokens (no train/tokens logged, no global_batch_size param): "
            f"{', '.join(left)}; --x steps shows them")


def _legend_label(r: RunRecord) -> str:
    best = f", best {r.best_val[1]:.3f}" if r.best_val and r.best_val[1] != r.final_val_loss else ""
    val = f", val {r.final_val_loss:.3f}{best}" if r.final_val_loss is not None else ""
    estimated = ", tokens estimated" if r.tokens_estimated else ""
    return f"{r.name}: {r.status.split(' ')[0]}{val}{estimated}"


def _style_axes(ax, axis: str, drawn: list) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    ends = [max(tx[-1] if tx else 0, vx[-1] if vx else 0) for _, (tx, _), (vx, _) in drawn]
    if axis == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if use_log_x(ends):
        ax.set_xscale("log")
    low, high = _y_limits(drawn)
    if low is not None:
        ax.set_ylim(low, high)
    ax.set_xlabel("tokens trained (all processes)" if axis == "tokens" else "optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"Train loss (lines) and validation loss (markers) against {axis}")
    ax.grid(alpha=0.3)
    if drawn:
        # The line styles' key is an extra artist; the runs' legend is the axes' own (ax.get_legend() finds it).
        styles = ax.legend(handles=[Line2D([], [], color="gray", label="train loss"),
                                    Line2D([], [], color="gray", linestyle="none", marker="o", markeredgecolor="black",
                                           markeredgewidth=0.5, label="val loss")], fontsize=8, loc="lower left")
        ax.add_artist(styles)
        ax.legend(fontsize=8, loc="upper right", title="run: status, final val loss", title_fontsize=8)


def use_log_x(ends: list[float]) -> bool:
    """Whether the runs, ending at these x, need a log x-axis: the longest more than LOG_X_RATIO times the shortest."""
    return bool(ends) and min(ends) > 0 and max(ends) / min(ends) > LOG_X_RATIO


def _y_limits(drawn: list) -> tuple[float | None, float | None]:
    """From just below the lowest loss to above the highest val loss or the train loss a tenth of the way in."""
    lows, highs = [], []
    for _, (_, ty), (_, vy) in drawn:
        values = [*ty, *vy]
        if not values:
            continue
        lows.append(min(values))
        highs.extend(vy)
        if ty:
            highs.append(ty[len(ty) // 10])
    if not lows:
        return None, None
    low, high = min(lows), max(highs)
    margin = 0.05 * (high - low) or 0.1
    return low - margin, high + margin
