"""Figures of an evaluation report (matplotlib, Agg backend, PNG files).

    training_curves.png     training loss of every run (its metrics.json history)
    ppl_by_position.png     Table 1 as lines: relative perplexity change by ahead position, per N_L
    accuracy_vs_nl.png      Table 2 overall accuracy against N_L, the decoder alone as a line
    attention_mask.png      the packed multi-trace mask of a small example (the paper's Fig. 2b)
    latent_norms.png        latent norms (held-out prompts) vs token-embedding norms (Coconut's trap)
    breakeven.png           the gap at position 1 and over 2..N_A against traces seen (log axis)

`make_plots(report, runs, out_dir)` draws whatever the report has data for and returns the paths.
"""
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..core.layout import AHEAD, LATENT, build_layout  # noqa: E402


def make_plots(report, runs, out_dir):
    """Every figure the report has data for, as PNGs in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = [("training_curves.png", lambda ax: plot_training(ax, _histories(report, runs))),
               ("ppl_by_position.png", lambda ax: plot_ppl_by_position(ax, report)),
               ("accuracy_vs_nl.png", lambda ax: plot_accuracy(ax, report)),
               ("attention_mask.png", plot_mask),
               ("latent_norms.png", lambda ax: plot_norms(ax, report)),
               ("breakeven.png", lambda ax: plot_breakeven(ax, report))]
    paths = []
    for name, draw in figures:
        fig, ax = plt.subplots(figsize=(6, 4.5 if name != "attention_mask.png" else 6))
        try:
            if draw(ax) is not False:
                fig.tight_layout()
                fig.savefig(out / name, dpi=110)
                paths.append(out / name)
        finally:
            plt.close(fig)
    return paths


def _histories(report, runs):
    """{run name: training history}, from Run records or else from each report run's metrics.json."""
    if runs:
        metrics = {r.name: r.metrics for r in runs}
    else:
        files = {r["name"]: Path(r["path"]).parent / "metrics.json" for r in report.get("runs", [])}
        metrics = {name: json.loads(f.read_text()) if f.is_file() else None for name, f in files.items()}
    return {name: m["history"] for name, m in metrics.items() if m and m.get("history")}


def _table(report, tid):
    return next((t for t in report.get("tables", []) if t["id"] == tid), None)


def _n_latents(report):
    return {r["name"]: r["n_latents"] for r in report.get("runs", [])}


# ---------------------------------------------------------------------------------------------
# The figures: each draws on one Axes, or returns False when there is nothing to draw
def plot_training(ax, histories):
    if not histories:
        return False
    for name, history in histories.items():
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set(xlabel="step", ylabel="training loss (ahead tokens)", title="Coprocessor training")
    ax.legend(fontsize=7)


def plot_ppl_by_position(ax, report):
    t, n_l = _table(report, "table1"), _n_latents(report)
    if not t or not t.get("relative_ppl_change_pct"):
        return False
    for name, change in t["relative_ppl_change_pct"].items():
        ax.plot(t["positions"], change, marker="o", ms=3, label=f"N_L={n_l[name]} ({name})")
    ax.axhline(0, color="gray", lw=0.8)
    n_ahead = {r["n_ahead"] for r in report.get("runs", []) if r["name"] in t["relative_ppl_change_pct"]}
    for n in n_ahead:                                   # positions past N_A were never trained on
        ax.axvline(n, color="gray", ls=":", lw=0.8)
    ax.set(xlabel="ahead position n (dotted: the runs' N_A)", ylabel="relative perplexity change (%)",
           title="Perplexity change by position (Table 1)")
    ax.legend(fontsize=7)


def plot_accuracy(ax, report):
    t, m = _table(report, "table1"), report.get("measurements", {})
    if not t or not t.get("relative_ppl_change_pct"):
        return False
    n_l = _n_latents(report)
    names = sorted(t["relative_ppl_change_pct"], key=lambda n: n_l[n])
    xs = [n_l[n] for n in names]
    ax.plot(xs, [m["runs"][n]["accuracy"]["overall"] for n in names], marker="o", label="cache augmentation")
    ax.axhline(m["baseline"]["accuracy"]["overall"], color="gray", ls="--", label="decoder alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
    ax.set_ylim(bottom=0)
    ax.set(xlabel="N_L (latents)", ylabel="exact-match accuracy (%)", title="Accuracy vs N_L (Table 2)")
    ax.legend(fontsize=7)


def plot_mask(ax):
    """Packed mask of "a b c d e f" with traces after b and d, N_L=2, N_A=2 (the paper's Fig. 2b)."""
    layout = build_layout(np.arange(6)[None], np.array([[1, 3]]), n_latents=2, n_ahead=2)
    mask, kinds = layout.packed_may_attend()[0], layout.slot_kinds()           # [S, S], [S]
    words = list("abcdef")
    labels = words + [f"z{j + 1}@{words[p]}" if j < layout.n_latents else words[p + 1 + j - layout.n_latents]
                      for p in layout.trace_positions[0] for j in range(layout.group_len)]
    colours = {LATENT: "tab:red", AHEAD: "tab:blue"}
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, kind in zip(ticks, kinds):
            tick.set_color(colours.get(int(kind), "black"))
    ax.set(xlabel="key", ylabel="query",
           title="Packed mask: originals (black), latents (red), ahead (blue)")


def plot_norms(ax, report):
    m = report.get("measurements", {})
    latents = {k: v for k, v in m.get("latent_norms", {}).items() if v}
    if not latents or not m.get("embedding_row_norms"):
        return False
    every = np.concatenate([m["embedding_row_norms"], *latents.values()])
    every = every[every > 0]
    bins = np.geomspace(every.min() * 0.9, every.max() * 1.1, 60)       # scales may differ 100x
    ax.hist(m["embedding_row_norms"], bins=bins, alpha=0.6, label="token embeddings")
    for name, norms in latents.items():
        ax.hist(norms, bins=bins, histtype="step", lw=1.5, label=f"latents {name}")
    ax.set(xscale="log", xlabel="L2 norm (log scale)", ylabel="count",
           title="Latent vs token-embedding norms")
    ax.legend(fontsize=7)


def plot_breakeven(ax, report):
    """Per run: position 1 (solid) and the mean over 2..N_A (dashed) against traces seen, log x."""
    t = _table(report, "breakeven")
    if not t or not t.get("curves"):
        return False
    for i, (name, c) in enumerate(t["curves"].items()):
        colour = f"C{i}"
        ax.plot(c["traces"], c["position_1"], color=colour, marker=".", ms=3, label=f"{name}: position 1")
        rest = [(x, y) for x, y in zip(c["traces"], c["positions_2_on"]) if y is not None]
        if rest:
            ax.plot(*zip(*rest), color=colour, ls="--", marker=".", ms=3,
                    label=f"{name}: mean of 2..{c['n_ahead']}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)      # +100% at the start, fractions of a percent later
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set(xlabel="traces seen (step x batch x K, log)", ylabel="perplexity change (%, symlog)",
           title="Break-even: gap to the decoder alone (< 0: helps)")
    ax.legend(fontsize=7)
