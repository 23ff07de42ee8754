"""The paper's tables as views of one evaluation's measurements (`runner.measure`), and the report files.
A table: {id, title, note, status, missing, header, rows, sources}; one whose runs are missing says "not
run", nothing filled in. The paper's numbers stand beside ours for shape, not for size."""
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import require
from ..files import atomic_write_bytes, finite_json
from ..training.train import TrainConfig, saved_train_config

PAPER = {   # the paper's numbers (Gemma-2 2B, N_A = 16 unless the table varies it) and their source
    "table1": {"source": "Table 1 (relative perplexity change, %, by ahead position; N_L = 8/16/32/64)",
               "by_nl": {8: {1: -1.53, 2: -1.67, 4: -1.39, 8: -1.22, 16: -0.85, 32: -0.55},
                         16: {1: -2.48, 2: -2.41, 4: -1.98, 8: -1.56, 16: -1.08, 32: -0.64},
                         32: {1: -3.28, 2: -3.15, 4: -2.66, 8: -2.11, 16: -1.50, 32: -0.88},
                         64: {1: -3.94, 2: -3.70, 4: -3.17, 8: -2.61, 16: -1.88, 32: -1.20}}},
    "table2": {"source": "Table 2 (GSM8K for N_L = 4..64, MMLU at N_L = 64)",
               "gsm8k_baseline": 21.38, "gsm8k": {4: 22.67, 8: 23.12, 16: 24.72, 32: 26.76, 64: 31.43},
               "mmlu_baseline": 52.00, "mmlu": {64: 56.70}},
    "table3": {"source": "Table 3 (pause tokens vs augmentation at 32 embeddings: perplexity, GSM8K)",
               "baseline": (10.96, 21.38), "pause": (11.63, 22.37), "augmented": (10.60, 26.76)},
    "table5": {"source": "Table 5 (GSM8K: coprocessor trained from scratch vs full finetune from the "
                         "decoder's weights)", "random": 25.78, "copy": 26.76},
    "table6": {"source": "Table 6 (GSM8K by N_A at 16 latents)",
               "by_na": {4: 24.03, 8: 24.11, 16: 24.72, 32: 23.73}},
    "table8": {"source": "Table 8 (GSM8K with the latents on time or 1/2/3 tokens late)",
               "by_delay": {0: 31.43, 1: 27.2, 2: 27.1, 3: 26.9}},
}
NOT_RUN = "not run"
DEFAULT_POSITIONS = TrainConfig.latent_positions   # the latents' position ids of a new `refimpl train`


# Which runs each table compares
def copy_runs(runs):
    """Copy-init runs under the latent positions most share (ties: the default); the others: Table P only."""
    copies = [r for r in runs if r.mode == "coprocessor" and r.init == "copy"]
    counts = Counter(r.latent_positions for r in copies)
    main = max(counts, key=lambda c: (counts[c], c == DEFAULT_POSITIONS), default=DEFAULT_POSITIONS)
    return [r for r in copies if r.latent_positions == main]


def table1_runs(runs):
    """Copy-init runs at the N_A most share (ties: the larger), by N_L: the columns of Tables 1, 2, 8."""
    copies = copy_runs(runs)
    counts = Counter(r.n_ahead for r in copies)
    n_a = max(counts, key=lambda n: (counts[n], n), default=None)
    return sorted([r for r in copies if r.n_ahead == n_a], key=lambda r: (r.n_latents, r.name))


def _partner(runs, like):
    """The copy-init run with like's N_L and latent positions (like's N_A preferred), or None."""
    same = [r for r in copy_runs(runs) if r.n_latents == like.n_latents
            and r.latent_positions == like.latent_positions]
    return next((r for r in same if r.n_ahead == like.n_ahead), next(iter(same), None))


def _groups(runs, key, varies, order):
    """Runs grouped by key (in first-appearance order), each sorted by order; groups that differ in varies."""
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return [r for g in groups.values() if len({varies(r) for r in g}) > 1 for r in sorted(g, key=order)]


def traces_of(r):
    """Training traces run r has seen: its step x batch x K (None if its config is not recorded)."""
    tc = r.meta.get("train_config") or {}
    return r.meta.get("step", 0) * tc["batch_size"] * tc["n_traces"] if "batch_size" in tc else None


def _table(tid, title, note, header, rows, sources, missing=None, **extra):
    """A table, "not run" where `missing` says why its runs are absent; the note ends with the paper's."""
    note += f" Paper: Liu et al. 2025, {PAPER[tid]['source']}." if tid in PAPER else ""
    return {"id": tid, "title": title, "note": note, "status": NOT_RUN if missing else "ok",
            "missing": missing, "header": header, "rows": rows, "sources": sources, **extra}


def _col(r):
    return f"N_L={r.n_latents} ({r.name})"


def _mean(xs):
    return float(np.mean(xs)) if len(xs) else ""


def _overall(m, r=None):              # accuracy (%) of run r, or of the decoder alone
    return (m["baseline"] if r is None else m["runs"][r.name])["accuracy"]["overall"]


def _changes(m, r):                   # relative perplexity change (%) of run r at ahead positions 1..H
    return m["runs"][r.name]["relative_ppl_change_pct"]


def _labelled(label, r, sources):
    """The row label of run r (None: a run not given), its checkpoint recorded in sources."""
    if r is None:
        return label
    sources[f"{label} ({r.name})"] = r.path
    return f"{label} ({r.name})"


# The tables
def table1(m, runs):
    main, H, by_nl = table1_runs(runs), m["horizon"], PAPER["table1"]["by_nl"]
    shown = sorted({p for p in (*by_nl[8], H, *(r.n_ahead for r in main)) if p <= H})  # the paper's, N_A, H
    header = ["position n"] + [_col(r) for r in main] + [f"paper N_L={k}" for k in by_nl]
    rows = [[n] + [_changes(m, r)[n - 1] for r in main] + [v.get(n, "") for v in by_nl.values()]
            for n in shown]
    note = (f"Held-out val windows of {m['seq_len']} tokens ({m.get('data', 'mixture')} data), the same points for "
            "the decoder alone and "
            f"every run; 100*(exp(nll_aug - nll_base) - 1) at ahead positions 1..{H} (all in report.json).")
    title = "Table 1: relative perplexity change (%) of the n-th token after the augmentation point"
    return _table("table1", title, note, header, rows, {_col(r): r.path for r in main},
                  None if main else "no copy-init coprocessor run given", positions=list(range(1, H + 1)),
                  relative_ppl_change_pct={r.name: _changes(m, r) for r in main})


def table2(m, runs):
    main, base, paper = table1_runs(runs), m["baseline"]["accuracy"], PAPER["table2"]
    accs = [base] + [m["runs"][r.name]["accuracy"] for r in main]          # the decoder alone first
    rows = [[t] + [a["by_task"][t]["accuracy"] for a in accs] for t in base["by_task"]]
    rows.append(["overall"] + [a["overall"] for a in accs])
    rows += [[f"paper {b.upper()}", paper[b + "_baseline"]] + [paper[b].get(r.n_latents, "") for r in main]
             for b in ("gsm8k", "mmlu")]
    alone = "" if main else "; no copy-init coprocessor run given: the decoder alone only"
    note = (f"{base['n']} prompts, [eot]+prompt, the coprocessor once at the prompt end, greedy to the first "
            f"newline, exact match; prompts batched, left-padded{alone}.")
    return _table("table2", "Table 2: exact-match accuracy (%) on held-out reasoning prompts", note,
                  ["task", "decoder alone"] + [_col(r) for r in main], rows, {_col(r): r.path for r in main},
                  None if main or base["n"] else "no copy-init coprocessor run given and no prompts")


def table3(m, runs):
    def ppl(measured, n_ahead):       # perplexity over ahead positions 1..n_ahead, and at position 1
        return [float(np.exp(np.mean(measured["ahead_nll"][:n]))) for n in (n_ahead, 1)]

    pause, paper, rows, sources = [r for r in runs if r.mode == "pause"], PAPER["table3"], [], {}
    for p in pause:
        rows.append(["decoder alone", 0, *ppl(m["baseline"], p.n_ahead), _overall(m), *paper["baseline"]])
        for label, r, key in (("pause tokens", p, "pause"),
                              ("cache augmentation", _partner(runs, p), "augmented")):
            cells = [NOT_RUN] * 3 if r is None else [*ppl(m["runs"][r.name], p.n_ahead), _overall(m, r)]
            rows.append([_labelled(label, r, sources), p.n_latents, *cells, *paper[key]])
    note = ("Pause tokens: the latents are the trained soft tokens, and do NOT depend on the input; cache "
            "augmentation computes them from the prompt's cache. Perplexity: exp(mean held-out nll at ahead "
            "positions 1..N_A of the pause run), the same points for every row; accuracy as in Table 2.")
    header = ["method", "N_L", "ppl n=1..N_A", "ppl n=1", "accuracy %", "paper ppl", "paper GSM8K"]
    return _table("table3", "Table 3: pause tokens vs cache augmentation at the same N_L", note, header,
                  rows, sources, None if pause else "no pause-token run given (`refimpl train --mode pause`)")


def table5(m, runs):
    rows, sources, gsm8k_alone = [], {}, PAPER["table2"]["gsm8k_baseline"]
    for rr in [r for r in runs if r.mode == "coprocessor" and r.init == "random"]:
        rows.append(["decoder alone", 0, rr.n_ahead, 0.0, 0.0, _overall(m), gsm8k_alone])
        for label, r in (("random", rr), ("copy", _partner(runs, rr))):
            ch = _changes(m, r) if r else []
            cells = [NOT_RUN] * 3 if r is None else [ch[0], _mean(ch[:r.n_ahead]), _overall(m, r)]
            rows.append([_labelled(label, r, sources), rr.n_latents, (r or rr).n_ahead, *cells,
                         PAPER["table5"][label]])
    header = ["coprocessor init", "N_L", "N_A", "ppl change n=1 %", "mean ppl change n=1..N_A %",
              "accuracy %", "paper GSM8K"]
    return _table("table5", "Tables 5/7: random-init vs copy-init coprocessor",
                  "Same held-out points and prompts as Tables 1-2.", header, rows, sources,
                  None if rows else "no random-init coprocessor run given (`refimpl train --init random`)")


def table6(m, runs):
    H = m["horizon"]
    shown = _groups(sorted(copy_runs(runs), key=lambda r: r.n_latents), lambda r: r.n_latents,
                    lambda r: r.n_ahead, order=lambda r: (r.n_ahead, r.name))
    rows = [[f"{r.n_ahead} ({r.name})", r.n_latents, _changes(m, r)[0], _mean(_changes(m, r)), _overall(m, r),
             PAPER["table6"]["by_na"].get(r.n_ahead, "")] for r in shown]
    header = ["N_A", "N_L", "ppl change n=1 %", f"mean ppl change n=1..{H} %", "accuracy %",
              "paper GSM8K (16 latents)"]
    return _table("table6", "Table 6: N_A ablation (copy-init runs that differ in n_ahead)",
                  f"Every run scored on the same points at positions 1..{H}, whatever N_A it trained with.",
                  header, rows, {r.name: r.path for r in shown}, None if shown else
                  "no two copy-init runs with the same N_L and different N_A")


def table_positions(m, runs):
    """Table P: runs that differ only in the latents' position ids, the default first."""
    def all_but_positions(r):         # r's options but its latent positions (and eval/save frequency)
        tc = {**saved_train_config(r.meta["train_config"], r.path), "mode": r.mode, "init": r.init,
              "n_latents": r.n_latents, "n_ahead": r.n_ahead}
        skip = ("latent_positions", "eval_every", "eval_batches")
        return tuple(sorted((k, v) for k, v in tc.items() if k not in skip))

    shown = _groups(runs, all_but_positions, lambda r: r.latent_positions,
                    order=lambda r: (r.latent_positions != DEFAULT_POSITIONS, r.latent_positions, r.name))
    rows = [[r.latent_positions, r.name, r.n_latents, ch[0], ch[1] if len(ch) > 1 else "",
             _mean(ch[1:r.n_ahead]), _mean(ch), _overall(m, r)] for r in shown for ch in [_changes(m, r)]]
    note = ("'behind' (the method): latent j at max(0, p-N_L+1+j), the last where x_{p+1} is predicted; "
            "'after' (the ablation): at p+1+j; ahead tokens keep their own ids. Runs in a group differ in "
            "nothing else (docs/method.md, C8).")
    header = ["latent positions", "run", "N_L", "ppl change n=1 %", "ppl change n=2 %",
              "mean ppl change n=2..N_A %", f"mean ppl change n=1..{m['horizon']} %", "accuracy %"]
    return _table("positions", "Table P: the latents' position ids (not in the paper)", note, header, rows,
                  {r.name: r.path for r in shown},
                  None if shown else "no two runs that differ only in --latent-positions")


def table_breakeven(m, runs):
    """The held-out gap against traces seen, from the evaluations each run made while training."""
    curves = {r.name: m["curves"][r.name] for r in runs if r.name in (m.get("curves") or {})}
    rows = [[name, c["steps"][i], c["traces"][i], c["position_1"][i], c["positions_2_on"][i]]
            for name, c in curves.items() for i in log_spaced(c["traces"])]
    even = {name: {key: _crossings(c["traces"], c[key]) for key in ("position_1", "positions_2_on")}
            for name, c in curves.items()}

    def said(name, key):                      # even[name][key] in words
        e, end = even[name][key], f"({curves[name][key][-1]:+.2f}% at the end)"
        if e["first"] is None:
            return f"not yet {end}"
        stays = f"stays there from {e['stays']:,}" if e["stays"] is not None else f"not for good {end}"
        return f"first at zero or below at {e['first']:,} traces, {stays}"

    summary = "; ".join(f"{name}: position 1 {said(name, 'position_1')}, positions 2..N_A "
                        f"{said(name, 'positions_2_on')}" for name in curves)
    note = ("Each run's own held-out val windows and points, measured every --eval-every steps while it "
            "trained; traces seen = step x batch x K; 100*(exp(nll_aug - nll_base) - 1). Rows log-spaced "
            f"(all evaluations in report.json). {summary}.")
    header = ["run", "step", "traces seen", "ppl change n=1 %", "mean ppl change n=2..N_A %"]
    return _table("breakeven", "Break-even: the gap to the decoder alone against traces seen", note, header,
                  rows, {r.name: r.path for r in runs if r.name in curves}, None if curves else
                  "no run with evaluations while training (`refimpl train --eval-every N`)",
                  curves=curves, break_even=even)


def log_spaced(xs, per_decade=3):
    """Indices of about per_decade entries per decade of the increasing positive xs, and the last."""
    picked, k = [], 0
    for i, x in enumerate(xs):
        if x >= xs[0] * 10 ** (k / per_decade):        # the first entry at or past each grid point
            picked.append(i)
            while x >= xs[0] * 10 ** (k / per_decade):
                k += 1
    return picked if not xs or picked[-1] == len(xs) - 1 else picked + [len(xs) - 1]


def _crossings(traces, gaps):
    """{"first": traces at the first evaluation at or below zero, "stays": from which all are} (or None)."""
    below = [g is not None and g <= 0 for g in gaps]
    stays = next((i for i in range(len(below)) if all(below[i:])), None)
    return {"first": next((t for t, b in zip(traces, below) if b), None),
            "stays": None if stays is None else traces[stays]}


def table8(m, runs):
    measured = m.get("async") or {}
    run = next((r for r in runs if r.name == measured.get("run")), None)
    rows = [["decoder alone", _overall(m), PAPER["table2"]["gsm8k_baseline"]]]
    for d, acc in (measured["by_delay"].items() if run else ()):
        late = "on time" if d == "0" else f"{d} token{'s' if d != '1' else ''} late"
        rows.append([late, acc["overall"], PAPER["table8"]["by_delay"].get(int(d), "")])
    which = (f"; run {run.name} (largest N_L, most trained; latents {run.latent_positions} the point)"
             if run else "")
    note = ("The coprocessor reads the PROMPT's cache; the decoder greedily decodes `delay` tokens without "
            f"latents, then the latents are appended and decoding goes on from the last latent{which}.")
    return _table("table8", "Table 8: asynchronous use (latents arriving late)", note,
                  ["latents arrive", "accuracy %", "paper GSM8K"], rows, {run.name: run.path} if run else {},
                  None if run else "no copy-init coprocessor run given")


def table_latency(m, runs):
    paths = {r.name: r.path for r in runs}
    lat = [x for x in m.get("latency") or [] if x["run"] in paths]
    rows = [[x["run"], x["n_latents"], x["augment_s"], x["sequential_s"], x["ratio"]] for x in lat]
    note = (f"Median of {lat[0]['repeats'] if lat else 0} repeats on one held-out prompt: one coprocessor "
            "call + one decoder pass over its N_L latents, vs N_L decoder extend calls one by one (greedy).")
    header = ["run", "N_L", "coprocessor + append (s)", "N_L decode steps (s)", "augment / decode"]
    return _table("latency", "Latency: N_L latents in one call vs N_L tokens one by one", note, header, rows,
                  {x["run"]: paths[x["run"]] for x in lat}, None if lat else "no coprocessor run given")


def table_sources(m, runs):
    """Every run's held-out change split by the source of each point's first target (English or reasoning)."""
    def cells(change, n_ahead):       # position 1, and the mean over 2..N_A ("" without such points)
        return (change[0], _mean(change[1:n_ahead])) if change else ("", "")
    rows = [[r.name, s, d["points"], *cells(d["relative_ppl_change_pct"], r.n_ahead)]
            for r in runs for s, d in m["runs"][r.name].get("by_source", {}).items()]
    return _table("sources", "By source: the held-out change where the first target is English text or a "
                  "reasoning line (not in the paper)", f"Held-out data: {m.get('data', 'mixture')}. A point "
                  "counts for the source of x_{p+1}; report.json holds every position (by_source).",
                  ["run", "source", "points", "ppl change n=1 %", "mean ppl change n=2..N_A %"], rows,
                  {r.name: r.path for r in runs}, None if rows else "no coprocessor run given")


TABLES = (table1, table2, table3, table5, table6, table_positions, table_sources, table_breakeven, table8,
          table_latency)


# The report
def headline(m, runs):
    """One sentence: where augmentation helps at this scale and where not yet, from the largest-N_L
    Table 1 run with the least training and the run with the most (None without runs)."""
    main = [r for r in table1_runs(runs) if traces_of(r) is not None]
    if not main:
        return None
    chosen = [min(main, key=lambda r: (-r.n_latents, traces_of(r))), max(main, key=traces_of)]
    chosen = chosen[:1] if chosen[0] is chosen[1] else chosen
    n_a, longest = chosen[0].n_ahead, chosen[-1].name
    first = {r.name: _changes(m, r)[0] for r in chosen}
    rest = {r.name: float(np.mean(_changes(m, r)[1:n_a])) for r in chosen}
    where = {f"ahead positions 2..{n_a}": rest, "ahead position 1 (the token read at the last latent)": first}
    helps = [w for w, v in where.items() if v[longest] < 0]
    not_yet = [w for w in where if w not in helps]
    said = ("helps at " + " and ".join(helps) + "".join(f" and does not yet help at {w}" for w in not_yet)
            if helps else "does not yet help at " + " or ".join(not_yet))
    ci = {r.name: {k: " [95% CI {:+.1f}, {:+.1f}]".format(*v) for k, v in m["runs"][r.name].get(
        "ci95_pct", {}).items()} for r in chosen}                     # a bootstrap over points (runner.py)
    details = "; ".join(f"{r.name} after {traces_of(r):,} training traces: position 1 {first[r.name]:+.1f}%"
                        f"{ci[r.name].get('position_1', '')}, positions 2..{n_a} {rest[r.name]:+.2f}%"
                        f"{ci[r.name].get(f'positions_2_{n_a}', '')}" for r in chosen)
    return (f"At this scale, augmentation {said} ({details} perplexity against the decoder alone on held-out "
            "windows; the break-even curve shows how the gaps move with training).")


def render_markdown(report):
    def fmt(v):
        return (f"{v:.3g}" if 0 < abs(v) < 0.1 else f"{v:.2f}") if isinstance(v, float) else str(v)

    c = report["config"]
    lines = ["# Evaluation report", ""]
    lines += [f"**{report['headline']}**", ""] if report.get("headline") else []
    if any(Path(p).name == "breakeven.png" for p in report.get("plots") or []):
        lines += ["![break-even curve](breakeven.png)", ""]
    lines += [(f"Decoder `{c['decoder']}` (hash {c['decoder_hash'][:12]}), {len(report['runs'])} runs; the "
               "method is docs/method.md. Paper numbers: Liu et al., Deliberation in Latent Space via "
               "Differentiable Cache Augmentation, ICML 2025, arXiv 2412.17747 (Gemma-2 2B, N_A = 16), each "
               "table's note naming its source; beside ours for shape, not for size."), ""]
    for t in report["tables"]:
        lines += [f"## {t['title']}", ""]
        if t["status"] == NOT_RUN:
            lines += [f"*{NOT_RUN}*: {t['missing']}.", ""]
            continue
        lines += ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
        lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in t["rows"]]
        lines += ["", f"*{t['note']}*", ""]
    return "\n".join(lines)


def write_report(report, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "report.json", out / "report.md"
    require(finite_json(report), f"refusing to write {paths[0]}: a figure is NaN or infinite (a run's "
                                 "numbers overflowed, or its metrics.json is damaged); check the runs")
    atomic_write_bytes(paths[0], (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(paths[1], (render_markdown(report) + "\n").encode())
    return list(paths)
