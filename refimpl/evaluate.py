"""Held-out evaluation of the frozen decoder with and without cache augmentation.

`ahead_nll` is the measurement behind the paper's Table 1: the loss of the n-th token after an
augmentation point, n = 1..N_A, averaged over held-out sequences and sampled points. The same
fixed points are used for the decoder alone (`trainable=None`) and with augmentation, so the two
numbers differ only by the latents.

The second half is `refimpl eval`: every run is measured once on the same held-out windows,
points and prompts, and the paper's Tables 1, 2, 3, 5/7, 6 and 8 (plus a latency table) are built
from those numbers, with the paper's own numbers (SPEC §8) beside them. Decoding goes through
`generate.complete`, the one implementation of augmented greedy decoding.
"""
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .backend import to_numpy, xp_of
from .checkpoint import atomic_write_bytes
from .errors import RefimplError, require
from .objective import loss_cached
from .traces import sample_trace_positions


def heldout_set(val_tokens, n_batches, batch_size, seq_len, n_traces, n_ahead, seed=1234):
    """Fixed held-out windows and trace positions: a list of (tokens [B, T], positions [B, K])."""
    from .data import iter_eval_batches
    rng = np.random.default_rng(seed)
    out = []
    for tokens in iter_eval_batches(val_tokens, batch_size, seq_len):
        if len(out) == n_batches:
            break
        out.append((tokens, sample_trace_positions(rng, tokens.shape[0], seq_len, n_traces, n_ahead)))
    return out


def ahead_nll(dec_params, trainable, cfg, heldout, n_latents, n_ahead, ahead_positions="continue"):
    """Mean held-out nll per ahead position, float64 [N_A] (position n = index n-1)."""
    total, count = np.zeros(n_ahead), 0
    for tokens, positions in heldout:
        _, out = loss_cached(dec_params, trainable, cfg, tokens, positions, n_latents, n_ahead, ahead_positions)
        nll = to_numpy(out["nll"]).astype(np.float64)                       # [B, K, N_A]
        total += nll.sum((0, 1))
        count += nll.shape[0] * nll.shape[1]
    return total / max(count, 1)


def relative_ppl_change(base_nll, aug_nll):
    """Relative perplexity change in %, per position: 100 * (exp(aug - base) - 1)."""
    return 100.0 * np.expm1(np.asarray(aug_nll) - np.asarray(base_nll))


def mean_row_norm(x):
    """Mean L2 norm of the rows of x [..., D] (latents or token embeddings), a float."""
    x = to_numpy(x).astype(np.float64)
    return float(np.sqrt((x * x).sum(-1)).mean())


def embedding_norm(dec_params):
    """Mean L2 norm of the decoder's token embeddings, the scale latents are compared with."""
    return mean_row_norm(dec_params["embed_tokens"])


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


@dataclass(frozen=True)
class EvalConfig:
    eval_batches: int = 8       # held-out windows: batches of batch_size windows of seq_len tokens
    batch_size: int = 8
    seq_len: int = 0            # 0: the decoder's max_seq_len
    n_traces: int = 16          # augmentation points per window
    horizon: int = 0            # ahead positions scored; 0: 2 * the largest N_A among the runs
    seed: int = 1234            # of the held-out points
    split: str = "test"         # reasoning prompts
    limit: int = 0              # 0: all prompts
    prompt_batch: int = 64      # prompts decoded together (left-padded)
    max_new_tokens: int = 10
    delays: tuple = (0, 1, 2, 3)
    latency_repeats: int = 5


@dataclass
class Run:
    name: str
    path: str
    meta: dict
    trainable: dict
    metrics: dict = None        # the run's metrics.json, if it has one

    mode = property(lambda self: self.meta["mode"])
    init = property(lambda self: self.meta["init"])
    n_latents = property(lambda self: int(self.meta["n_latents"]))
    ahead_positions = property(lambda self: self.meta.get("train_config", {}).get("ahead_positions", "continue"))
    n_ahead = property(lambda self: int(self.meta["n_ahead"]))

    def summary(self):
        return {"name": self.name, "path": self.path, "mode": self.mode, "init": self.init,
                "n_latents": self.n_latents, "n_ahead": self.n_ahead, "step": self.meta.get("step"),
                "train_config": self.meta.get("train_config")}


def run_paths(coprocessors=(), runs_dir=None):
    """Checkpoint paths from --coprocessor (files or run dirs) and --runs DIR (its subdirs)."""
    from .generate import coprocessor_file
    paths = [coprocessor_file(p) for p in coprocessors]
    if runs_dir is not None:
        runs_dir = Path(runs_dir)
        require(runs_dir.is_dir(), f"--runs {runs_dir} is not a directory: pass the folder holding run subfolders")
        found = sorted(d / "coprocessor.npz" for d in runs_dir.iterdir() if (d / "coprocessor.npz").is_file())
        require(found, f"--runs {runs_dir} holds no run (no subfolder with coprocessor.npz): train some "
                       "with `refimpl train --out DIR/NAME`")
        paths += found
    return paths


def load_runs(paths, decoder_hash, dtype=np.float32, xp=np):
    """Run records; a checkpoint trained against another decoder raises RefimplError."""
    from .train import load_coprocessor
    runs, seen = [], set()
    for path in map(Path, paths):
        trainable, _, meta = load_coprocessor(path, decoder_hash, dtype, xp)
        name = path.parent.name if path.name == "coprocessor.npz" else path.stem
        name = name if name not in seen else f"{name}-{len(seen)}"
        seen.add(name)
        metrics_file = path.parent / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        except (ValueError, UnicodeDecodeError) as e:
            raise RefimplError(f"run metrics {metrics_file} is not valid JSON ({e}): delete it (only "
                               "the training-curve plot reads it) or re-run the training") from None
        runs.append(Run(name, str(path), meta, trainable, metrics))
    return runs


# ---------------------------------------------------------------------------------------------
# Measurements
def check_horizon(horizon, seq_len, n_traces, max_seq_len):
    """The held-out points p must satisfy p + horizon <= T - 1, with n_traces distinct ones."""
    require(seq_len <= max_seq_len, f"--seq-len {seq_len} exceeds the decoder's max_seq_len={max_seq_len}")
    require(horizon >= 1 and horizon + n_traces <= seq_len,
            f"horizon {horizon} does not fit seq_len {seq_len}: points lie in [0, T-1-horizon], "
            f"{seq_len - horizon} of them, and {n_traces} are needed per window; use a smaller "
            "--horizon or --n-traces, or a longer --seq-len")


def reasoning_accuracy(dec_params, cfg, tokenizer, problems, trainable=None, delay=0,
                       prompt_batch=64, max_new_tokens=10, ahead_positions="continue"):
    """Exact-match accuracy (%) overall and per task, greedy, coprocessor once at the prompt end.

    Returns (accuracy dict, row norms of every latent appended: float64 [n_prompts * N_L]).
    """
    from .generate import complete
    order = sorted(range(len(problems)), key=lambda i: len(problems[i]["prompt"]))  # less padding
    predictions, norms = [None] * len(problems), []
    for start in range(0, len(order), prompt_batch):
        idx = order[start:start + prompt_batch]
        texts, dec = complete(dec_params, cfg, tokenizer, [problems[i]["prompt"] for i in idx],
                              trainable, max_new_tokens=max_new_tokens, delay=delay, stop_at_newline=True,
                              ahead_positions=ahead_positions)
        for i, text in zip(idx, texts):
            predictions[i] = text.strip()
        if dec.latents is not None:
            norms.append(row_norms(dec.latents).ravel())                       # [b, N_L] -> [b*N_L]
    correct = [p == prob["answer"].strip() for p, prob in zip(predictions, problems)]
    return _accuracy(problems, correct, predictions), (np.concatenate(norms) if norms else np.zeros(0))


def row_norms(x):
    """L2 norms of the rows of x [..., D] as float64 [...] on the host."""
    x = to_numpy(x).astype(np.float64)
    return np.sqrt((x * x).sum(-1))


def _accuracy(problems, correct, predictions):
    pct = lambda c, n: 100.0 * c / max(n, 1)
    by_task = {}
    for prob, ok in zip(problems, correct):
        t = by_task.setdefault(prob["task"], {"correct": 0, "n": 0})
        t["correct"], t["n"] = t["correct"] + int(ok), t["n"] + 1
    for t in by_task.values():
        t["accuracy"] = pct(t["correct"], t["n"])
    examples = [{"prompt": p["prompt"], "answer": p["answer"], "prediction": pred}
                for p, pred in zip(problems[:5], predictions[:5])]
    return {"overall": pct(sum(correct), len(correct)), "correct": int(sum(correct)), "n": len(correct),
            "by_task": dict(sorted(by_task.items())), "examples": examples, "predictions": predictions}


def latency(dec_params, cfg, trainable, prompt_ids, repeats=5):
    """Median seconds of (one coprocessor call + the decoder over its N_L latents) vs N_L decode steps."""
    from .coprocessor import augment
    from .decoder import extend, generate, prefill
    xp = xp_of(dec_params["embed_tokens"])
    logits, cache = prefill(dec_params, cfg, xp.asarray([prompt_ids]))
    n = int(trainable["soft_tokens"].shape[0])

    def augmented():
        extend(dec_params, cfg, cache, augment(trainable, cfg, cache))      # cache + N_L slots

    def sequential():
        generate(dec_params, cfg, cache, logits[:, -1], n)                  # N_L extend calls

    aug_s, seq_s = _median_seconds(augmented, repeats), _median_seconds(sequential, repeats)
    return {"n_latents": n, "prompt_tokens": len(prompt_ids), "augment_s": aug_s,
            "sequential_s": seq_s, "ratio": aug_s / seq_s, "repeats": repeats}


def _median_seconds(fn, repeats):
    fn()                                                                     # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure(dec_params, cfg, tokenizer, runs, ec, val_tokens, problems, log=lambda m: None):
    """Every number the tables use: ahead nll and accuracy for the decoder alone and each run,
    accuracy by delay for the Table 8 run, latency, and norms."""
    T = ec.seq_len or cfg.max_seq_len
    H = ec.horizon or 2 * max([r.n_ahead for r in runs] or [16])
    check_horizon(H, T, ec.n_traces, cfg.max_seq_len)
    heldout = heldout_set(val_tokens, ec.eval_batches, ec.batch_size, T, ec.n_traces, H, ec.seed)
    acc = lambda t, delay=0, ahead="continue": reasoning_accuracy(
        dec_params, cfg, tokenizer, problems, t, delay, ec.prompt_batch, ec.max_new_tokens, ahead)
    log(f"decoder alone: ahead nll at 1..{H}, accuracy on {len(problems)} prompts")
    base_nll = ahead_nll(dec_params, None, cfg, heldout, 0, H)
    out = {"horizon": H, "seq_len": T, "baseline": {"ahead_nll": base_nll.tolist(), "accuracy": acc(None)[0]},
           "runs": {}, "latent_norms": {}}
    for r in runs:
        log(f"run {r.name} ({r.mode}, {r.init}, N_L={r.n_latents}, N_A={r.n_ahead})")
        nll = ahead_nll(dec_params, r.trainable, cfg, heldout, r.n_latents, H, r.ahead_positions)
        accuracy, norms = acc(r.trainable, 0, r.ahead_positions)
        out["runs"][r.name] = {"ahead_nll": nll.tolist(), "accuracy": accuracy,
                               "relative_ppl_change_pct": relative_ppl_change(base_nll, nll).tolist(),
                               "mean_latent_norm": float(norms.mean()) if norms.size else None}
        out["latent_norms"][r.name] = np.round(norms[:4096], 4).tolist()          # for the histogram
    out["embedding_norm"] = embedding_norm(dec_params)
    out["embedding_row_norms"] = np.round(row_norms(dec_params["embed_tokens"]), 4).tolist()
    out["async"] = _measure_async(runs, ec, acc, log)
    out["latency"] = _measure_latency(dec_params, cfg, tokenizer, runs, ec, problems, log)
    return out


def _measure_async(runs, ec, acc, log):
    main = table1_runs(runs)
    if not main:
        return None
    r = max(main, key=lambda r: r.n_latents)
    log(f"asynchronous use: {r.name}, delays {list(ec.delays)}")
    return {"run": r.name, "by_delay": {str(d): acc(r.trainable, d, r.ahead_positions)[0] for d in ec.delays}}


def _measure_latency(dec_params, cfg, tokenizer, runs, ec, problems, log):
    chosen = table1_runs(runs) or [r for r in runs if r.mode == "coprocessor"]
    if not chosen or not problems:
        return []
    log(f"latency: {len(chosen)} runs x {ec.latency_repeats} repeats")
    prompt = [tokenizer.eot_id] + tokenizer.encode(problems[0]["prompt"])
    return [{"run": r.name, **latency(dec_params, cfg, r.trainable, prompt, ec.latency_repeats)}
            for r in chosen]


# ---------------------------------------------------------------------------------------------
# Which runs each table compares
def _all_copy_runs(runs):
    return [r for r in runs if r.mode == "coprocessor" and r.init == "copy"]


def main_convention(runs):
    """The ahead_positions convention shared by most copy-init runs (ties: "continue")."""
    counts = Counter(r.ahead_positions for r in _all_copy_runs(runs))
    return max(counts, key=lambda c: (counts[c], c == "continue")) if counts else "continue"


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
        for r in sorted(group, key=lambda r: (r.ahead_positions != "continue", r.name)):
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


def evaluate_runs(decoder_path, paths, ec=EvalConfig(), backend="numpy", dtype="float32", log=lambda m: None):
    """(report, runs): load the decoder and runs, measure everything, build the tables."""
    from .backend import get_dtype, get_xp
    from .checkpoint import check_tokenizer, load_decoder
    from .data import load_reasoning_eval, load_tokens
    from .tokenizer import load_tokenizer
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, dec_meta = load_decoder(decoder_path, dt, xp)
    runs = load_runs(paths, dec_meta["decoder_hash"], dt, xp)
    tok = load_tokenizer()
    check_tokenizer(dec_meta, tok.sha256, decoder_path)
    problems = load_reasoning_eval(ec.split)
    problems = problems[:ec.limit] if ec.limit else problems
    m = measure(dec_params, cfg, tok, runs, ec, load_tokens("val", tok), problems, log)
    config = {**asdict(ec), "decoder": str(decoder_path), "decoder_hash": dec_meta["decoder_hash"],
              "backend": backend, "dtype": dtype, "horizon": m["horizon"], "seq_len": m["seq_len"]}
    return build_report(m, runs, config), runs


# ---------------------------------------------------------------------------------------------
# CLI
def add_arguments(p):
    from .cli import nonneg_int, positive_int
    d = EvalConfig()
    p.add_argument("--decoder", default=None, help="frozen decoder checkpoint (default: the shipped one)")
    p.add_argument("--coprocessor", action="append", default=[], metavar="PATH",
                   help="coprocessor checkpoint or run directory (repeatable)")
    p.add_argument("--runs", default=None, metavar="DIR", help="a folder of runs (subfolders with coprocessor.npz)")
    p.add_argument("--out", default=None, help="write report.json, report.md and plots here")
    p.add_argument("--no-plots", action="store_true")
    for name in ("eval_batches", "batch_size", "n_traces", "prompt_batch", "max_new_tokens", "latency_repeats"):
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=getattr(d, name))
    for name, what in (("seq_len", "0: max_seq_len"), ("horizon", "0: 2 x the largest N_A"),
                       ("limit", "0: all prompts"), ("seed", "of the held-out points")):
        p.add_argument("--" + name.replace("_", "-"), type=nonneg_int, default=getattr(d, name), help=what)
    p.add_argument("--split", choices=("val", "test"), default=d.split, help="reasoning prompts")
    p.add_argument("--delays", type=nonneg_int, nargs="+", default=list(d.delays), help="Table 8 delays")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quiet", action="store_true")


def run(args):
    import sys
    from .data import TINY_DATA
    fields = {k: getattr(args, k) for k in EvalConfig.__dataclass_fields__ if k != "delays"}
    ec = EvalConfig(**fields, delays=tuple(args.delays))
    decoder = args.decoder or TINY_DATA / "checkpoints" / "decoder-demo.npz"
    log = (lambda m: None) if args.quiet else (lambda m: print(f"eval: {m}", file=sys.stderr, flush=True))
    report, runs = evaluate_runs(decoder, run_paths(args.coprocessor, args.runs), ec, args.backend, args.dtype, log)
    report["config"]["arguments"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.out is None:
        print(render_markdown(report))
        return 0
    if not args.no_plots:
        from .plots import make_plots
        report["plots"] = [str(p) for p in make_plots(report, runs, args.out)]
    written = write_report(report, args.out)
    print(render_markdown(report))
    print(f"wrote {', '.join(map(str, written + report.get('plots', [])))}")
    return 0
