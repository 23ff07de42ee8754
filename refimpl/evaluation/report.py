"""The paper's tables, rebuilt from one evaluation's measurements, and the report files.

Each table is a view of the numbers `runner.measure` took, with the paper's own numbers beside
ours for shape, not for size. A table whose runs are missing says "not run"; nothing is filled in.
"""
import json
from collections import Counter
from pathlib import Path

import numpy as np

from .. import __version__
from ..training.checkpoint import atomic_write_bytes

# =============================================================================================
# `refimpl eval`: the paper's tables, reproduced in kind on held-out data
#
# Every run is measured once (ahead-token nll at positions 1..H on fixed held-out windows and
# points; exact-match accuracy on the held-out reasoning prompts); the tables are then views of
# those numbers. A table whose runs are missing says "not run"; nothing is filled in.
PAPER = {  # SPEC §8: Gemma-2 2B, N_A = 16
    "table1": {8: {1: -1.53, 2: -1.67, 4: -1.39, 8: -1.22, 16: -0.85, 32: -0.55},
               16: {1: -2.48, 2: -2.41, 4: -1.98, 8: -1.56, 16: -1.08, 32: -0.64},
               32: {1: -3.28, 2: -3.15, 4: -2.66, 8: -2.11, 16: -1.50, 32: -0.88},
               64: {1: -3.94, 2: -3.70, 4: -3.17, 8: -2.61, 16: -1.88, 32: -1.20}},
    "gsm8k_baseline": 21.38, "gsm8k": {4: 22.67, 8: 23.12, 16: 24.72, 32: 26.76, 64: 31.43},
    "mmlu_baseline": 52.00, "mmlu": {64: 56.70},
    "table3": {"baseline": (10.96, 21.38), "pause": (11.63, 22.37), "augmented": (10.60, 26.76)},
    "table5": {"random": 25.78, "copy": 26.76},
    "table6": {4: 24.03, 8: 24.11, 16: 24.72, 32: 23.73},
    "table8": {0: 31.43, 1: 27.2, 2: 27.1, 3: 26.9},
}


TABLE1_POSITIONS = (1, 2, 4, 8, 16, 32)


NOT_RUN = "not run"


# ---------------------------------------------------------------------------------------------
# Which runs each table compares
def _all_copy_runs(runs):
    return [r for r in runs if r.mode == "coprocessor" and r.init == "copy"]


def main_convention(runs):
    """The ahead_positions convention shared by most copy-init runs (ties: "original", the default)."""
    counts = Counter(r.ahead_positions for r in _all_copy_runs(runs))
    return max(counts, key=lambda c: (counts[c], c == "original")) if counts else "original"


def copy_runs(runs):
    """Copy-init coprocessor runs under the main position convention (the other is Table P's)."""
    main = main_convention(runs)
    return [r for r in _all_copy_runs(runs) if r.ahead_positions == main]


def main_n_ahead(runs):
    """The N_A shared by most copy-init coprocessor runs (ties: the larger), or None."""
    counts = Counter(r.n_ahead for r in copy_runs(runs))
    return max(counts, key=lambda n: (counts[n], n)) if counts else None


def table1_runs(runs):
    """Copy-init coprocessor runs at the main N_A, by N_L: the columns of Tables 1, 2 and 8."""
    n_a = main_n_ahead(runs)
    return sorted([r for r in copy_runs(runs) if r.n_ahead == n_a], key=lambda r: (r.n_latents, r.name))


def _partner(runs, like):
    """The copy-init coprocessor run with like's N_L (same N_A preferred), or None."""
    same = [r for r in copy_runs(runs) if r.n_latents == like.n_latents and r.ahead_positions == like.ahead_positions]
    return next((r for r in same if r.n_ahead == like.n_ahead), same[0] if same else None)


# ---------------------------------------------------------------------------------------------
# Tables: {id, title, note, status, missing, header, rows, sources}; cells are numbers or text
def _table(tid, title, note, header, rows, sources, missing=None, **extra):
    """missing: why the table's runs are absent; the table is then "not run" (rows kept in JSON)."""
    status = NOT_RUN if missing else "ok"
    return {"id": tid, "title": title, "note": note, "status": status, "missing": missing,
            "header": header, "rows": rows, "sources": sources, **extra}


def _col(r):
    return f"N_L={r.n_latents} ({r.name})"


def _ppl(nll, n):
    return float(np.exp(np.mean(nll[:n])))


def table1(m, runs):
    main, H = table1_runs(runs), m["horizon"]
    shown = sorted({p for p in TABLE1_POSITIONS if p <= H} | {p for p in (main_n_ahead(runs), H) if p and p <= H})
    paper = PAPER["table1"]
    header = ["position n"] + [_col(r) for r in main] + [f"paper N_L={k}" for k in paper]
    rows = [[n] + [m["runs"][r.name]["relative_ppl_change_pct"][n - 1] for r in main]
            + [paper[k].get(n, "") for k in paper] for n in shown]
    return _table("table1", "Table 1: relative perplexity change (%) of the n-th token after the augmentation point",
                  f"Held-out val windows of {m['seq_len']} tokens, the same sampled points for the decoder alone and "
                  f"every run; 100*(exp(nll_aug - nll_base) - 1) at each ahead position 1..{H} (all in report.json).",
                  header, rows, {_col(r): r.path for r in main},
                  None if main else "no copy-init coprocessor run given",
                  positions=list(range(1, H + 1)),
                  relative_ppl_change_pct={r.name: m["runs"][r.name]["relative_ppl_change_pct"] for r in main})


def table2(m, runs):
    main, base = table1_runs(runs), m["baseline"]["accuracy"]
    accs = [m["runs"][r.name]["accuracy"] for r in main]
    header = ["task", "decoder alone"] + [_col(r) for r in main]
    rows = [[t, base["by_task"][t]["accuracy"]] + [a["by_task"][t]["accuracy"] for a in accs]
            for t in base["by_task"]]
    rows.append(["overall", base["overall"]] + [a["overall"] for a in accs])
    for bench in ("gsm8k", "mmlu"):
        rows.append([f"paper {bench.upper()}", PAPER[bench + "_baseline"]]
                    + [PAPER[bench].get(r.n_latents, "") for r in main])
    return _table("table2", "Table 2: exact-match accuracy (%) on held-out reasoning prompts",
                  f"{base['n']} prompts, [eot]+prompt, coprocessor called once at the end of the prompt, greedy "
                  "decoding to the first newline, exact match; prompts batched with left padding.",
                  header, rows, {_col(r): r.path for r in main},
                  None if main else "no copy-init coprocessor run given")


def table3(m, runs):
    pause = [r for r in runs if r.mode == "pause"]
    header = ["method", "N_L", "ppl n=1..N_A", "ppl n=1", "accuracy %", "paper ppl", "paper GSM8K"]
    rows, sources, missing = [], {}, None if pause else "no pause-token run given (`refimpl train --mode pause`)"
    for p in pause:
        aug, n_a = _partner(runs, p), p.n_ahead
        base_nll = m["baseline"]["ahead_nll"]
        rows.append(["decoder alone", 0, _ppl(base_nll, n_a), _ppl(base_nll, 1),
                     m["baseline"]["accuracy"]["overall"], *PAPER["table3"]["baseline"]])
        for label, r, key in (("pause tokens", p, "pause"), ("cache augmentation", aug, "augmented")):
            if r is None:
                rows.append([label, p.n_latents, NOT_RUN, NOT_RUN, NOT_RUN, *PAPER["table3"][key]])
                continue
            mr = m["runs"][r.name]
            rows.append([f"{label} ({r.name})", r.n_latents, _ppl(mr["ahead_nll"], n_a), _ppl(mr["ahead_nll"], 1),
                         mr["accuracy"]["overall"], *PAPER["table3"][key]])
            sources[f"{label} ({r.name})"] = r.path
    return _table("table3", "Table 3: pause tokens vs cache augmentation at the same N_L",
                  "Perplexity = exp(mean held-out nll over ahead positions 1..N_A of the pause run), same points "
                  "for every row; accuracy as in Table 2. Paper: 32 embeddings, Gemma-2 2B.",
                  header, rows, sources, missing)


def table5(m, runs):
    rand = [r for r in runs if r.mode == "coprocessor" and r.init == "random"]
    header = ["coprocessor init", "N_L", "N_A", "ppl change n=1 %", "mean ppl change n=1..N_A %",
              "accuracy %", "paper GSM8K"]
    rows, sources = [], {}
    missing = None if rand else "no random-init coprocessor run given (`refimpl train --init random`)"
    for rr in rand:
        rows.append(["decoder alone", 0, rr.n_ahead, 0.0, 0.0, m["baseline"]["accuracy"]["overall"],
                     PAPER["gsm8k_baseline"]])
        for label, r in (("random", rr), ("copy", _partner(runs, rr))):
            if r is None:
                rows.append([label, rr.n_latents, rr.n_ahead, NOT_RUN, NOT_RUN, NOT_RUN, PAPER["table5"][label]])
                continue
            mr = m["runs"][r.name]
            ch = mr["relative_ppl_change_pct"]
            rows.append([f"{label} ({r.name})", r.n_latents, r.n_ahead, ch[0], float(np.mean(ch[:r.n_ahead])),
                         mr["accuracy"]["overall"], PAPER["table5"][label]])
            sources[f"{label} ({r.name})"] = r.path
    return _table("table5", "Tables 5/7: random-init vs copy-init coprocessor",
                  "Same held-out points and prompts as Tables 1-2. Paper (Table 5, GSM8K): trained from scratch "
                  "vs full finetune from the decoder's weights.", header, rows, sources, missing)


def table6(m, runs):
    by_nl = {}
    for r in copy_runs(runs):
        by_nl.setdefault(r.n_latents, []).append(r)
    groups = {k: sorted(v, key=lambda r: (r.n_ahead, r.name)) for k, v in sorted(by_nl.items())
              if len({r.n_ahead for r in v}) > 1}
    H = m["horizon"]
    header = ["N_A", "N_L", "ppl change n=1 %", f"mean ppl change n=1..{H} %", "accuracy %",
              "paper GSM8K (16 latents)"]
    rows, sources = [], {}
    for group in groups.values():
        for r in group:
            mr = m["runs"][r.name]
            ch = mr["relative_ppl_change_pct"]
            rows.append([f"{r.n_ahead} ({r.name})", r.n_latents, ch[0], float(np.mean(ch)),
                         mr["accuracy"]["overall"], PAPER["table6"].get(r.n_ahead, "")])
            sources[r.name] = r.path
    return _table("table6", "Table 6: N_A ablation (copy-init runs that differ in n_ahead)",
                  f"Every run scored on the same points at positions 1..{H}, whatever N_A it was trained with.",
                  header, rows, sources,
                  None if groups else "no two copy-init runs with the same N_L and different N_A")


def table_positions(m, runs):
    """Runs that differ only in the ahead tokens' position ids (SPEC §5 convention)."""
    key = lambda r: (r.mode, r.init, r.n_latents, r.n_ahead)
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r.ahead_positions for r in v}) > 1}
    H = m["horizon"]
    header = ["ahead positions", "run", "N_L", "ppl change n=1 %", "ppl change n=2 %",
              f"mean ppl change n=1..{H} %", "accuracy %"]
    rows, sources = [], {}
    for group in groups.values():
        for r in sorted(group, key=lambda r: (r.ahead_positions != "original", r.name)):
            mr = m["runs"][r.name]
            ch = mr["relative_ppl_change_pct"]
            rows.append([r.ahead_positions, r.name, r.n_latents, ch[0], ch[1] if len(ch) > 1 else "",
                         float(np.mean(ch)), mr["accuracy"]["overall"]])
            sources[r.name] = r.path
    return _table("positions", "Table P: position ids of the ahead tokens (SPEC §5 choice)",
                  "'continue': tokens after the latents keep counting after them (the default); 'original': "
                  "they keep their positions in the sequence. Not in the paper.",
                  header, rows, sources,
                  None if groups else "no two runs that differ only in --ahead-positions")


def table8(m, runs):
    paths = {r.name: r.path for r in runs}
    a = m.get("async") if (m.get("async") or {}).get("run") in paths else None
    header = ["latents arrive", "accuracy %", "paper GSM8K"]
    rows = [["decoder alone", m["baseline"]["accuracy"]["overall"], PAPER["gsm8k_baseline"]]]
    if a:
        rows += [["on time" if d == "0" else f"{d} token{'s' if d != '1' else ''} late", acc["overall"],
                  PAPER["table8"].get(int(d), "")] for d, acc in a["by_delay"].items()]
    src = {a["run"]: paths[a["run"]]} if a else {}
    return _table("table8", "Table 8: asynchronous use (latents arriving late)",
                  "The coprocessor reads the PROMPT's cache; the decoder greedily decodes `delay` tokens without "
                  "latents, then the latents are appended after them and decoding goes on from the last latent"
                  + (f"; run {a['run']} (largest N_L; tokens after the latents: {_convention(runs, a['run'])} "
                     "positions)." if a else "."),
                  header, rows, src, None if a else "no copy-init coprocessor run given")


def _convention(runs, name):
    return next(r.ahead_positions for r in runs if r.name == name)


def table_latency(m, runs):
    paths = {r.name: r.path for r in runs}
    lat = [x for x in m.get("latency") or [] if x["run"] in paths]
    header = ["run", "N_L", "coprocessor + append (s)", "N_L decode steps (s)", "augment / sequential"]
    rows = [[x["run"], x["n_latents"], x["augment_s"], x["sequential_s"], x["ratio"]] for x in lat]
    reps = lat[0]["repeats"] if lat else 0
    return _table("latency", "Latency: N_L latents in one call vs N_L tokens one by one",
                  f"Median of {reps} repeats on one held-out prompt: one coprocessor call + one decoder pass over "
                  "its N_L latents, vs N_L sequential decoder extend calls (greedy).",
                  header, rows, {x["run"]: paths[x["run"]] for x in lat},
                  None if lat else "no coprocessor run given")


TABLES = (table1, table2, table3, table5, table6, table_positions, table8, table_latency)


# ---------------------------------------------------------------------------------------------
# The report
def build_report(m, runs, config):
    return {"refimpl_version": __version__, "config": config, "runs": [r.summary() for r in runs],
            "measurements": m, "tables": [t(m, runs) for t in TABLES]}


def render_markdown(report):
    c = report["config"]
    lines = ["# Evaluation report", "",
             f"Decoder `{c['decoder']}` (hash {c['decoder_hash'][:12]}), {len(report['runs'])} runs. "
             f"Paper numbers (Gemma-2 2B, SPEC §8) are beside ours for shape, not for size.", ""]
    for t in report["tables"]:
        lines += [f"## {t['title']}", ""]
        if t["status"] == NOT_RUN:
            lines += [f"*{NOT_RUN}*: {t['missing']}.", ""]
            continue
        lines += ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
        lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in t["rows"]]
        lines += ["", f"*{t['note']}*", ""]
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if 0 < abs(v) < 0.1 else f"{v:.2f}"
    return str(v)


def write_report(report, out_dir):
    """out_dir/report.json and out_dir/report.md; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "report.json", out / "report.md"
    atomic_write_bytes(paths[0], (json.dumps(report, indent=1) + "\n").encode())  # a kill keeps the old one
    atomic_write_bytes(paths[1], (render_markdown(report) + "\n").encode())
    return list(paths)
