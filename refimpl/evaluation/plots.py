"""The report's figures as PNGs (matplotlib, Agg): each draws on one Axes, False without data."""
import io
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..core.layout import AHEAD, LATENT, build_layout
from ..files import atomic_write_bytes


def plot_training(ax, report, runs):
    histories = [(r.name, r.metrics["history"]) for r in runs if r.metrics and r.metrics.get("history")]
    if not histories:
        return False
    for name, history in histories:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set(xlabel="step", ylabel="training loss (ahead tokens)", title="Coprocessor training")


def plot_ppl_by_position(ax, report, runs):
    t = _table(report, "table1")
    if not t.get("relative_ppl_change_pct"):
        return False
    for label, change in zip(t["header"][1:], t["relative_ppl_change_pct"].values()):  # Table 1's columns
        ax.plot(t["positions"], change, marker="o", ms=3, label=label)
    ax.axhline(0, color="gray", lw=0.8)
    for n in {r["n_ahead"] for r in report.get("runs", []) if r["name"] in t["relative_ppl_change_pct"]}:
        ax.axvline(n, color="gray", ls=":", lw=0.8)    # positions past N_A were never trained on
    ax.set(xlabel="ahead position n (dotted: the runs' N_A)", ylabel="relative perplexity change (%)",
           title="Perplexity change by position (Table 1)")


def plot_accuracy(ax, report, runs):
    t, m = _table(report, "table1"), report.get("measurements", {})
    n_l = {r["name"]: r["n_latents"] for r in report.get("runs", [])}
    if not t.get("relative_ppl_change_pct"):
        return False
    names = sorted(t["relative_ppl_change_pct"], key=lambda n: n_l[n])
    xs = [n_l[n] for n in names]
    ax.plot(xs, [m["runs"][n]["accuracy"]["overall"] for n in names], marker="o", label="cache augmentation")
    ax.axhline(m["baseline"]["accuracy"]["overall"], color="gray", ls="--", label="decoder alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
    ax.set_ylim(bottom=0)
    ax.set(xlabel="N_L (latents)", ylabel="exact-match accuracy (%)", title="Accuracy vs N_L (Table 2)")


def plot_mask(ax, report, runs):
    """Packed mask of "a b c d e f" with traces after b and d, N_L=2, N_A=2 (the paper's Fig. 2b)."""
    layout = build_layout(np.arange(6)[None], np.array([[1, 3]]), n_latents=2, n_ahead=2)
    mask, kinds = layout.packed_may_attend()[0], layout.slot_kinds()           # [S, S], [S]
    words = list("abcdef")
    labels = words + [f"z{j + 1}@{words[p]}" if j < layout.n_latents else words[p + 1 + j - layout.n_latents]
                      for p in layout.trace_positions[0] for j in range(layout.group_len)]
    ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.6)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, kind in zip(ticks, kinds):
            tick.set_color({LATENT: "tab:red", AHEAD: "tab:blue"}.get(int(kind), "black"))
    ax.set(xlabel="key", ylabel="query", title="Packed mask: originals (black), latents (red), ahead (blue)")


def plot_norms(ax, report, runs):
    """Latent norms (held-out prompts) vs token-embedding norms: Coconut's trap."""
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


def plot_breakeven(ax, report, runs):
    curves = _table(report, "breakeven").get("curves")
    if not curves:
        return False
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(c["traces"], c["position_1"], color=f"C{i}", marker=".", ms=3, label=f"{name}: position 1")
        rest = [(x, y) for x, y in zip(c["traces"], c["positions_2_on"]) if y is not None]
        if rest:
            ax.plot(*zip(*rest), color=f"C{i}", ls="--", marker=".", ms=3,
                    label=f"{name}: mean of 2..{c['n_ahead']}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)      # +100% at the start, fractions of a percent later
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set(xlabel="traces seen (step x batch x K, log)", ylabel="perplexity change (%, symlog)",
           title="Break-even: gap to the decoder alone (< 0: helps)")


FIGURES = {"training_curves.png": plot_training, "ppl_by_position.png": plot_ppl_by_position,
           "accuracy_vs_nl.png": plot_accuracy, "attention_mask.png": plot_mask,
           "latent_norms.png": plot_norms, "breakeven.png": plot_breakeven}


def make_plots(report, runs, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        fig, ax = plt.subplots(figsize=(6, 6 if draw is plot_mask else 4.5))
        try:
            if draw(ax, report, runs) is not False:
                if ax.get_legend_handles_labels()[0]:       # every figure but the mask
                    ax.legend(fontsize=7)
                fig.tight_layout()
                fig.savefig(png := io.BytesIO(), format="png", dpi=110)
                atomic_write_bytes(out / name, png.getvalue())
                paths.append(out / name)
        finally:
            plt.close(fig)
    return paths


def _table(report, tid):
    return next((t for t in report.get("tables", []) if t["id"] == tid), {})
