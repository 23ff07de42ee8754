"""`refimpl eval`: load a decoder and runs, measure everything once, build the report. The decoder alone and
every run are scored on the same held-out points and prompts, each run at its trained latent positions."""
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..backend import get_dtype, get_xp, to_numpy, xp_of
from ..core.coprocessor import augment
from ..core.decoder import decode, extend, prefill
from ..data.corpus import load_reasoning_eval, load_tokens
from ..errors import require
from ..files import check_schema, read_json
from ..training.checkpoint import coprocessor_file, load_coprocessor, load_model
from ..training.heldout import ahead_nll, embedding_norm, heldout_set, point_nll, relative_ppl_change
from ..training.train import METRICS, saved_train_config
from .generate import complete, trained_latent_positions
from .report import TABLES, headline, table1_runs, traces_of


@dataclass(frozen=True)
class EvalConfig:
    eval_batches: int = 8       # held-out windows: batches of batch_size windows of seq_len tokens
    batch_size: int = 8
    seq_len: int = 0            # 0: the decoder's max_seq_len
    n_traces: int = 16          # augmentation points per window
    horizon: int = 0            # ahead positions scored; 0: 2 * the largest N_A among the runs
    seed: int = 1234            # of the held-out points
    skip_windows: int = 0       # held-out windows skipped first (64: past every training-time evaluation)
    split: str = "test"         # reasoning prompts
    limit: int = 0              # 0: all prompts
    prompt_batch: int = 64      # prompts decoded together (left-padded)
    max_new_tokens: int = 10
    delays: tuple = (0, 1, 2, 3)
    latency_repeats: int = 5
    data: str = "mixture"       # the held-out windows' source (corpus.SOURCES)


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
    latent_positions = property(lambda self: trained_latent_positions(self.meta))
    n_ahead = property(lambda self: int(self.meta["n_ahead"]))

    def summary(self):
        return {"name": self.name, "path": self.path, "mode": self.mode, "init": self.init,
                "n_latents": self.n_latents, "n_ahead": self.n_ahead, "step": self.meta.get("step"),
                "train_config": self.meta.get("train_config")}


def run_paths(coprocessors=(), runs=None):
    """Checkpoint paths of coprocessors (files or run folders) and of every run folder in `runs`."""
    paths = [coprocessor_file(p) for p in coprocessors]
    if runs is not None:
        runs = Path(runs)
        require(runs.is_dir(), f"runs={runs} is not a directory: pass the folder holding run subfolders")
        found = sorted(d / "coprocessor.npz" for d in runs.iterdir() if (d / "coprocessor.npz").is_file())
        require(found, f"runs={runs} holds no run (no subfolder with coprocessor.npz): train some "
                       "with `refimpl train --out DIR/NAME`")
        paths += found
    return paths


def load_runs(paths, decoder_hash, dtype=np.float32, xp=np):
    """Run records; a checkpoint trained against another decoder raises RefimplError."""
    runs, seen = [], set()
    for path in map(Path, paths):
        trainable, _, meta = load_coprocessor(path, decoder_hash, dtype, xp)
        name = path.parent.name if path.name == "coprocessor.npz" else path.stem
        name = name if name not in seen else f"{name}-{len(seen)}"
        seen.add(name)
        metrics_file = path.parent / "metrics.json"
        fix = "delete it (only the training curves read it) or re-run the training"
        metrics = check_schema(read_json(metrics_file, "run metrics", fix), METRICS,
                               f"run metrics {metrics_file}", fix) if metrics_file.is_file() else None
        runs.append(Run(name, str(path), meta, trainable, metrics))
    return runs


def measure(dec_params, cfg, tokenizer, runs, ec, val_tokens, problems, log=lambda m: None, reasoning=None):
    """The one measurement dict every table is a view of (report.py). reasoning: bool [len(val_tokens)],
    True on the tokens of reasoning lines: each point also counts for the source of its first target."""
    T = ec.seq_len or cfg.max_seq_len
    H = ec.horizon or 2 * max([r.n_ahead for r in runs] or [16])
    require(T <= cfg.max_seq_len, f"seq_len={T} exceeds the decoder's max_seq_len={cfg.max_seq_len}")
    require(H >= 1 and H + ec.n_traces <= T,     # n_traces distinct points p with p + H <= T - 1
            f"horizon={H}{'' if ec.horizon else ' (the default, 2 x the largest N_A)'} does not fit "
            f"seq_len={T}: a window needs n_traces={ec.n_traces} distinct points p "
            "with p + horizon <= seq_len - 1; pass horizon + n_traces <= seq_len")
    heldout = heldout_set(val_tokens, ec.eval_batches, ec.batch_size, T, ec.n_traces, H, ec.seed,
                          ec.skip_windows)

    def acc(run=None, delay=0):       # (accuracy, latent norms), the decoder alone or run's latents late
        trainable, positions = (None, "behind") if run is None else (run.trainable, run.latent_positions)
        return reasoning_accuracy(dec_params, cfg, tokenizer, problems, trainable, delay, ec.prompt_batch,
                                  ec.max_new_tokens, positions)

    first = np.concatenate([(ec.skip_windows + i * ec.batch_size + np.arange(len(p)))[:, None] * T + p + 1
                            for i, (_, p) in enumerate(heldout)]).ravel()          # [P]: x_{p+1} in val_tokens
    assert np.array_equal(np.asarray(val_tokens)[first], np.concatenate(                  # the same tokens
        [np.take_along_axis(t, p + 1, 1) for t, p in heldout]).ravel()), "held-out windows out of step"
    reasoning = np.zeros(len(val_tokens), bool) if reasoning is None else np.asarray(reasoning)
    sources = {"text": ~reasoning[first], "reasoning": reasoning[first]}           # [P] each

    def by_source(base, nll):         # {source: points, % change per position} of [P, H] nll arrays
        return {s: {"points": int(k.sum()), "relative_ppl_change_pct":
                    relative_ppl_change(base[k].mean(0), nll[k].mean(0)).tolist() if k.any() else None}
                for s, k in sources.items()}

    log(f"decoder alone: ahead nll at 1..{H}, accuracy on {len(problems)} prompts")
    base = point_nll(dec_params, None, cfg, heldout, 0, H)                             # [P, H]
    base_nll = base.mean(0)
    out = {"horizon": H, "seq_len": T, "data": ec.data, "runs": {}, "latent_norms": {},
           "baseline": {"ahead_nll": base_nll.tolist(), "accuracy": acc()[0],
                        "points": {s: int(k.sum()) for s, k in sources.items()}}}
    for r in runs:
        log(f"run {r.name} ({r.mode}, {r.init}, N_L={r.n_latents}, N_A={r.n_ahead})")
        points = point_nll(dec_params, r.trainable, cfg, heldout, r.n_latents, H, r.latent_positions)
        nll, (accuracy, norms) = points.mean(0), acc(r)
        out["runs"][r.name] = {"ahead_nll": nll.tolist(), "accuracy": accuracy,
                               "relative_ppl_change_pct": relative_ppl_change(base_nll, nll).tolist(),
                               "by_source": by_source(base, points),
                               "ci95_pct": bootstrap(base, points, r.n_ahead),
                               "mean_latent_norm": float(norms.mean()) if norms.size else None}
        out["latent_norms"][r.name] = np.round(norms[:4096], 4).tolist()          # for the histogram
    out["embedding_norm"] = embedding_norm(dec_params)
    embed = to_numpy(dec_params["embed_tokens"]).astype(np.float64)                # [V, D] on the host
    out["embedding_row_norms"] = np.round(np.linalg.norm(embed, axis=-1), 4).tolist()
    out["curves"] = _measure_curves(dec_params, cfg, runs, val_tokens, log)
    # Table 8: accuracy by delay of the largest-N_L main run (ties: the most trained)
    late = max(table1_runs(runs), key=lambda r: (r.n_latents, traces_of(r) or 0), default=None)
    out["async"] = None
    if late is not None:
        log(f"asynchronous use: {late.name}, delays {list(ec.delays)}")
        out["async"] = {"run": late.name, "by_delay": {str(d): acc(late, d)[0] for d in ec.delays}}
    out["latency"] = _measure_latency(dec_params, cfg, tokenizer, runs, ec, problems, log)
    return out


def bootstrap(base, nll, n_ahead, n=2000, seed=0):
    """95% percentile-bootstrap intervals over the points ([P, H] nll arrays) of the % change at position 1
    and of the mean change over positions 2..n_ahead."""
    P = len(base)
    w = np.random.default_rng(seed).multinomial(P, np.full(P, 1 / P), size=n) / P        # [n, P] resamples
    change = relative_ppl_change(w @ base, w @ nll)                                        # [n, H]
    stats = {"position_1": change[:, 0], **({f"positions_2_{n_ahead}": change[:, 1:n_ahead].mean(1)}
                                            if n_ahead > 1 else {})}
    return {k: np.percentile(v, [2.5, 97.5]).tolist() for k, v in stats.items()}


def _measure_curves(dec_params, cfg, runs, val_tokens, log):
    """{run: break-even curve} of runs with 2+ evaluations in metrics.json: the gap (%) at 1 and 2..N_A."""
    curves = {}
    for r in runs:
        metrics = r.metrics or {}
        evals = [e for e in metrics.get("evals", []) if e.get("ahead_loss")]
        tc = saved_train_config(metrics.get("train_config") or r.meta["train_config"], r.path)
        if len(evals) < 2:
            continue
        base, n_a = metrics.get("baseline_ahead_loss"), tc["n_ahead"]
        if base is None:
            log(f"break-even curve of {r.name}: the decoder alone on its held-out set")
            T = tc["seq_len"] or cfg.max_seq_len
            held = heldout_set(val_tokens, tc["eval_batches"], tc["batch_size"], T, tc["n_traces"], n_a)
            base = ahead_nll(dec_params, None, cfg, held, 0, n_a).tolist()
        steps, per_step = [e["step"] for e in evals], tc["batch_size"] * tc["n_traces"]
        change = [relative_ppl_change(base, e["ahead_loss"]) for e in evals]          # [n_evals][N_A]
        curves[r.name] = {"steps": steps, "traces": [s * per_step for s in steps],
                          "position_1": [float(c[0]) for c in change],
                          "positions_2_on": [float(np.mean(c[1:])) if len(c) > 1 else None for c in change],
                          "n_ahead": len(base), "traces_per_step": per_step}
    return curves


def _measure_latency(dec_params, cfg, tokenizer, runs, ec, problems, log):
    """Per main run: median seconds of (one coprocessor call + the decoder over its latents) vs N_L steps."""
    chosen = table1_runs(runs) or [r for r in runs if r.mode == "coprocessor"]
    if not chosen or not problems:
        return []
    log(f"latency: {len(chosen)} runs x {ec.latency_repeats} repeats")
    prompt = [tokenizer.eot_id] + tokenizer.encode(problems[0]["prompt"])
    xp, out = xp_of(dec_params["embed_tokens"]), []

    def median_seconds(fn, *args):
        fn(*args)                                                            # warm-up
        return float(np.median(timeit.repeat(lambda: fn(*args), number=1, repeat=ec.latency_repeats)))

    def augmented(r, cache):                  # z [1, N_L, D] at ids [1, N_L], then cache + N_L slots
        extend(dec_params, cfg, cache, *augment(r.trainable, cfg, cache, r.latent_positions))

    for r in chosen:
        logits, cache = prefill(dec_params, cfg, xp.asarray([prompt]))
        n = int(r.trainable["soft_tokens"].shape[0])
        aug_s = median_seconds(augmented, r, cache)
        seq_s = median_seconds(decode, dec_params, cfg, cache, logits[:, -1], n)   # N_L extend calls
        out.append({"run": r.name, "n_latents": n, "prompt_tokens": len(prompt), "augment_s": aug_s,
                    "sequential_s": seq_s, "ratio": aug_s / seq_s, "repeats": ec.latency_repeats})
    return out


def reasoning_accuracy(dec_params, cfg, tokenizer, problems, trainable=None, delay=0,
                       prompt_batch=64, max_new_tokens=10, latent_positions="behind"):
    """(accuracy dict, norms of every latent appended: float64 [n_prompts * N_L]); exact match, greedy."""
    order = sorted(range(len(problems)), key=lambda i: len(problems[i]["prompt"]))  # less padding
    predictions, norms = [None] * len(problems), []
    for start in range(0, len(order), prompt_batch):
        idx = order[start:start + prompt_batch]
        texts, dec = complete(dec_params, cfg, tokenizer, [problems[i]["prompt"] for i in idx],
                              trainable, max_new_tokens=max_new_tokens, delay=delay, stop_at_newline=True,
                              latent_positions=latent_positions)
        for i, text in zip(idx, texts):
            predictions[i] = text.strip()
        if dec.latents is not None:
            norms.append(np.linalg.norm(to_numpy(dec.latents).astype(np.float64), axis=-1).ravel())  # [b*N_L]
    correct = [p == prob["answer"].strip() for p, prob in zip(predictions, problems)]
    return _accuracy(problems, correct, predictions), (np.concatenate(norms) if norms else np.zeros(0))


def _accuracy(problems, correct, predictions):
    """{overall (%), correct, n, by_task: {task: {correct, n, accuracy}}, 5 examples, predictions}."""
    def score(oks):
        return {"correct": int(sum(oks)), "n": len(oks), "accuracy": 100.0 * sum(oks) / max(len(oks), 1)}
    total, tasks = score(correct), sorted({p["task"] for p in problems})
    return {"overall": total.pop("accuracy"), **total,
            "by_task": {t: score([ok for p, ok in zip(problems, correct) if p["task"] == t]) for t in tasks},
            "examples": [{"prompt": p["prompt"], "answer": p["answer"], "prediction": pred}
                         for p, pred in zip(problems[:5], predictions[:5])], "predictions": predictions}


def evaluate_runs(decoder_path, paths, ec=EvalConfig(), backend="numpy", dtype="float32", log=lambda m: None):
    """(report, runs): load the decoder and runs, measure everything, build the report and its tables."""
    xp, dt = get_xp(backend), get_dtype(dtype)
    dec_params, cfg, dec_meta, tok = load_model(decoder_path, dt, xp)
    runs = load_runs(paths, dec_meta["decoder_hash"], dt, xp)
    problems = load_reasoning_eval(ec.split)[:ec.limit or None]
    m = measure(dec_params, cfg, tok, runs, ec, load_tokens("val", tok, ec.data), problems, log,
                load_tokens("val", tok, ec.data, reasoning_mask=True))
    config = {**asdict(ec), "decoder": str(decoder_path), "decoder_hash": dec_meta["decoder_hash"],
              "backend": backend, "dtype": dtype, "horizon": m["horizon"], "seq_len": m["seq_len"]}
    report = {"refimpl_version": __version__, "config": config, "runs": [r.summary() for r in runs],
              "headline": headline(m, runs), "measurements": m, "tables": [t(m, runs) for t in TABLES]}
    return report, runs
