"""Score screen runs against the shipped decoder, the way docs/results.md §3 chooses recipes.

    python tools/score_screens.py RUN_DIR... [--json OUT]

Relative perplexity change (%) against the decoder alone at ahead position 1 and its mean over
2..8, on three fixed sets of held-out points:
    selection  val windows 0..63, 16 points each, seed 99: what recipes are chosen on;
    test       windows 64..111, seed 1234, as `refimpl eval --skip-windows 64`: report only;
    test_h16   the same windows with `refimpl eval`'s default horizon 16 (other points), scored
               at 1 and 2..8 as well.
Each run is read back under the position conventions it was trained with. A RUN_DIR.time file
beside a run ({"wall_s": ...}) adds its wall time to the table.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refimpl.data.corpus import SHIPPED_DECODER, load_tokens  # noqa: E402
from refimpl.evaluation.generate import trained_convention, trained_latent_positions  # noqa: E402
from refimpl.training.checkpoint import load_coprocessor, load_model  # noqa: E402
from refimpl.training.heldout import ahead_nll, heldout_set, relative_ppl_change  # noqa: E402

H = 8          # horizon: ahead positions scored


def main(argv):
    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if not argv or any(a.startswith("-") for a in argv):
        sys.exit(__doc__.strip().splitlines()[2].strip())
    dec, cfg, dec_meta, tok = load_model(SHIPPED_DECODER)
    val = load_tokens("val", tok)
    T = cfg.max_seq_len
    sets = {"selection": heldout_set(val, 8, 8, T, 16, H, 99, 0),       # windows 0..63
            "test": heldout_set(val, 6, 8, T, 16, H, 1234, 64),         # windows 64..111
            "test_h16": heldout_set(val, 6, 8, T, 16, 2 * H, 1234, 64)}  # the same windows, refimpl eval's points
    horizon = {"selection": H, "test": H, "test_h16": 2 * H}
    base = {name: ahead_nll(dec, None, cfg, held, 0, horizon[name]) for name, held in sets.items()}
    rows = {}
    for run in map(Path, argv):
        t0 = time.perf_counter()
        trainable, _, meta = load_coprocessor(run / "coprocessor.npz", dec_meta["decoder_hash"])
        m = json.loads((run / "metrics.json").read_text())
        hist = [h["loss"] for h in m["history"]]
        row = {"readout": meta["train_config"].get("readout", "norm"),
               "soft_lr_scale": meta["train_config"].get("soft_lr_scale", 1.0),
               "seed": meta["train_config"]["seed"], "steps": meta["step"],
               "final_loss": hist[-1], "final_loss_mean50": float(np.mean(hist[-50:])),
               "train_seconds": m.get("train_seconds")}
        timing = run.parent / f"{run.name}.time"
        if timing.is_file():
            row["wall_s"] = json.loads(timing.read_text())["wall_s"]
        for name, held in sets.items():
            nll = ahead_nll(dec, trainable, cfg, held, int(meta["n_latents"]), horizon[name],
                            trained_convention(meta), trained_latent_positions(meta))
            change = relative_ppl_change(base[name], nll)
            row[name] = {"pos1": float(change[0]), "pos2_8": float(change[1:H].mean()),
                         "change": change.tolist()}
        row["score_seconds"] = time.perf_counter() - t0
        rows[run.name] = row
    print(f"{'run':<16} {'sel pos1':>9} {'sel 2..8':>9} {'test pos1':>9} {'test 2..8':>9} {'loss':>7} "
          f"{'loss50':>7} {'wall s':>7} {'t16 pos1':>9} {'t16 2..8':>9}")
    for name, r in rows.items():
        print(f"{name:<16} {r['selection']['pos1']:+9.2f} {r['selection']['pos2_8']:+9.3f} "
              f"{r['test']['pos1']:+9.2f} {r['test']['pos2_8']:+9.3f} {r['final_loss']:7.4f} "
              f"{r['final_loss_mean50']:7.4f} {r.get('wall_s', float('nan')):7.0f} "
              f"{r['test_h16']['pos1']:+9.2f} {r['test_h16']['pos2_8']:+9.3f}")
    if out:
        Path(out).write_text(json.dumps({"baseline_nll": {k: v.tolist() for k, v in base.items()},
                                         "runs": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
