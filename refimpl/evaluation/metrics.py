"""Measurements on held-out reasoning prompts: exact-match accuracy with the coprocessor called once
at the end of the prompt (paper Table 2; Table 8 with the latents late), the latency of one
coprocessor call against N_L decode steps, and the check that the horizon fits the windows.
"""
import time

import numpy as np

from ..backend import to_numpy, xp_of
from ..core.coprocessor import augment
from ..core.decoder import decode, extend, prefill
from ..errors import require
from .generate import complete


def check_horizon(horizon, seq_len, n_traces, max_seq_len):
    """The held-out points p must satisfy p + horizon <= T - 1, with n_traces distinct ones."""
    require(seq_len <= max_seq_len, f"seq_len={seq_len} exceeds the decoder's max_seq_len={max_seq_len}")
    require(horizon >= 1 and horizon + n_traces <= seq_len,
            f"horizon={horizon} does not fit seq_len={seq_len}: the points lie in [0, T-1-horizon], "
            f"{seq_len - horizon} of them, and n_traces={n_traces} distinct ones are needed per window; "
            "horizon + n_traces must be <= seq_len")


def reasoning_accuracy(dec_params, cfg, tokenizer, problems, trainable=None, delay=0,
                       prompt_batch=64, max_new_tokens=10, latent_positions="behind"):
    """(accuracy dict, row norms of every latent appended: float64 [n_prompts * N_L]): exact match,
    greedy, the coprocessor once at the prompt end, its latents at the positions it was trained with."""
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
            norms.append(row_norms(dec.latents).ravel())                       # [b, N_L] -> [b*N_L]
    correct = [p == prob["answer"].strip() for p, prob in zip(predictions, problems)]
    return _accuracy(problems, correct, predictions), (np.concatenate(norms) if norms else np.zeros(0))


def row_norms(x):
    """L2 norms of the rows of x [..., D] as float64 [...] on the host."""
    x = to_numpy(x).astype(np.float64)
    return np.sqrt((x * x).sum(-1))


def _accuracy(problems, correct, predictions):
    """{overall (%), correct, n, by_task: {task: {correct, n, accuracy}}, 5 examples, predictions}."""
    def score(oks):
        return {"correct": int(sum(oks)), "n": len(oks), "accuracy": 100.0 * sum(oks) / max(len(oks), 1)}
    tasks = {}
    for prob, ok in zip(problems, correct):
        tasks.setdefault(prob["task"], []).append(ok)
    total = score(correct)
    return {"overall": total.pop("accuracy"), **total,
            "by_task": {t: score(oks) for t, oks in sorted(tasks.items())},
            "examples": [{"prompt": p["prompt"], "answer": p["answer"], "prediction": pred}
                         for p, pred in zip(problems[:5], predictions[:5])], "predictions": predictions}


def latency(dec_params, cfg, trainable, prompt_ids, repeats=5, latent_positions="behind"):
    """Median seconds of (one coprocessor call + the decoder over its N_L latents) vs N_L decode steps."""
    xp = xp_of(dec_params["embed_tokens"])
    logits, cache = prefill(dec_params, cfg, xp.asarray([prompt_ids]))
    n = int(trainable["soft_tokens"].shape[0])

    def augmented():
        z, ids = augment(trainable, cfg, cache, latent_positions)            # [1, N_L, D], [1, N_L]
        extend(dec_params, cfg, cache, z, ids)                              # cache + N_L slots

    def median_seconds(fn):
        fn()                                                                 # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    aug_s = median_seconds(augmented)
    seq_s = median_seconds(lambda: decode(dec_params, cfg, cache, logits[:, -1], n))    # N_L extend calls
    return {"n_latents": n, "prompt_tokens": len(prompt_ids), "augment_s": aug_s,
            "sequential_s": seq_s, "ratio": aug_s / seq_s, "repeats": repeats}
