"""Plots: every figure is a non-empty PNG; missing data skips a figure instead of failing."""
import numpy as np

from refimpl.evaluation.plots import make_plots
from refimpl.evaluation.runner import Run

PNG = b"\x89PNG\r\n\x1a\n"


def small_report(tmp_path):
    """A report as `refimpl eval` builds it, and its two runs with their metrics.json training history."""
    runs, records = [], []
    for name, n_l in (("a", 2), ("b", 4)):
        path = str(tmp_path / "runs" / name / "coprocessor.npz")
        history = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 6)]
        records.append(Run(name, path, {"n_latents": n_l, "n_ahead": 3}, None, {"history": history}))
        runs.append({"name": name, "path": path, "n_latents": n_l, "n_ahead": 3})
    acc = lambda x: {"overall": x}
    m = {"baseline": {"accuracy": acc(10.0)},
         "runs": {"a": {"accuracy": acc(12.0)}, "b": {"accuracy": acc(15.0)}},
         "latent_norms": {"a": [6.9, 6.8, 7.0], "b": [6.7, 6.95]},
         "embedding_row_norms": list(np.linspace(0.1, 0.3, 50))}
    table1 = {"id": "table1", "positions": [1, 2, 3], "header": ["position n", "N_L=2 (a)", "N_L=4 (b)"],
              "relative_ppl_change_pct": {"a": [-1.0, -0.5, -0.2], "b": [-2.0, -1.0, -0.4]}}
    curve = {"traces": [64, 640, 6400], "position_1": [150.0, 12.0, -0.5], "positions_2_on": [3.0, 0.1, -0.2],
             "n_ahead": 3}
    breakeven = {"id": "breakeven", "curves": {"b": curve}}
    return {"runs": runs, "measurements": m, "tables": [table1, breakeven]}, records


def test_make_plots_writes_nonempty_pngs(tmp_path):
    paths = make_plots(*small_report(tmp_path), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["accuracy_vs_nl.png", "attention_mask.png", "breakeven.png",
                                             "latent_norms.png", "ppl_by_position.png", "training_curves.png"]
    for p in paths:
        blob = p.read_bytes()
        assert blob[:8] == PNG and len(blob) > 5000


def test_missing_data_skips_figures(tmp_path):
    paths = make_plots({"runs": [], "measurements": {}, "tables": []}, [], tmp_path)
    assert [p.name for p in paths] == ["attention_mask.png"]             # needs no data
    assert paths[0].read_bytes()[:8] == PNG
