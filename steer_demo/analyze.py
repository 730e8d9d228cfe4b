"""Stages 6-7: evaluate the saved SAE (read back from disk) and derive labels.

Writes next to the SAE: ``sparsity.safetensors`` (log10 density on the held-out tokens),
``labels.json`` (one feature per line, greppable) and ``quality.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .common import (
    HOOK_NAME,
    NEURONPEDIA_ID,
    configure_threads,
    log,
    read_json,
    without_timings,
    write_json,
)
from .corpus import read_corpus
from .harvest import load_activations
from .labels import CONCEPTS, build_labels, concept_probe
from .sae_io import decode_sparse, encode_topk, load_sae, save_sparsity

LABELS_FILE = "labels.json"
QUALITY_FILE = "quality.json"


def write_labels(path: Path, meta: dict, feats: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('{"meta": ' + json.dumps(meta, ensure_ascii=False) + ',\n"features": [\n')
        f.write(",\n".join(json.dumps(ft, ensure_ascii=False) for ft in feats))
        f.write("\n]}\n")
    tmp.replace(path)


def analyze(model_dir: Path, work: Path, sae_dir: Path, train_stats: dict, harvest_info: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    t0 = time.monotonic()
    configure_threads()
    cfg, w = load_sae(sae_dir)
    data = load_activations(work)
    x_all = data["acts"]
    is_eval = data["is_eval"].bool()
    n = x_all.shape[0]

    vals = torch.empty(n, cfg["k"])
    idx = torch.empty(n, cfg["k"], dtype=torch.long)
    sq_err = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, n, 8192):
            xb = x_all[i : i + 8192].float()
            v, ix = encode_topk(xb, cfg, w)
            vals[i : i + 8192], idx[i : i + 8192] = v, ix
            sq_err[i : i + 8192] = (xb - decode_sparse(v, ix, w)).double().pow(2).sum(-1)
    log(f"  encoded {n} rows with the saved SAE in {time.monotonic() - t0:.1f}s")

    def ev_of(mask) -> float:
        x = x_all[mask].double()
        total = (x - x.mean(0, keepdim=True)).pow(2).sum()
        return float(1.0 - sq_err[mask].sum() / total)

    active = vals > 0
    l0 = active.sum(-1).float()
    d_sae = cfg["d_sae"]

    def density(mask) -> torch.Tensor:
        c = torch.zeros(d_sae).index_add_(0, idx[mask].reshape(-1), active[mask].reshape(-1).float())
        return c / max(1, int(mask.sum()))

    dens_eval = density(is_eval)
    dens_all = density(torch.ones(n, dtype=torch.bool))
    save_sparsity(torch.log10(dens_eval + 1e-10), sae_dir)

    docs = read_corpus(work)
    row_doc = data["row_doc"].tolist()
    row_topic = [docs[i].topic for i in row_doc]
    row_source = [docs[i].source for i in row_doc]

    ev_by_source = {}
    for src in sorted(set(row_source)):
        m = torch.tensor([s == src for s in row_source]) & is_eval
        if int(m.sum()) >= 50:
            ev_by_source[src] = round(ev_of(m), 4)

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t1 = time.monotonic()
    lab = build_labels(
        vals, idx, data["tokens"], data["row_window"], data["row_pos"], data["windows"], tok, d_sae
    )
    feats = lab["features"]
    # densities in labels are over the whole corpus (train + held-out): more stable than the eval-only ones
    log(
        f"  labelled {sum(f['label'] is not None for f in feats)} live features in {time.monotonic() - t1:.1f}s"
    )

    concepts = {
        name: concept_probe(
            feats, vals, idx, data["tokens"], row_topic, {**spec, "decode": lambda t: tok.decode([t])}
        )
        for name, spec in CONCEPTS.items()
    }
    labels_meta = {
        "sae": NEURONPEDIA_ID,
        "hook_name": HOOK_NAME,
        "method": "top-activating tokens over the harvested demo corpus (train + held-out); label = dominant "
        "token(s); of several latents with one label the purest keeps it, the others get a distinguishing "
        "suffix (another top token, or 'after X'/'before X' from the contexts); label_purity = share of the "
        "top activations on the label's token(s); density over the whole corpus",
        "corpus_tokens": n,
        "concepts": {k: v["best"] for k, v in concepts.items()},
    }
    write_labels(sae_dir / LABELS_FILE, labels_meta, feats)

    n_dead_eval = int((dens_eval == 0).sum())
    n_dead_all = int((dens_all == 0).sum())
    n_unique = sum(1 for f in feats if f["label"] is not None and f["unique"])
    n_live = sum(1 for f in feats if f["label"] is not None)
    comp_path = work / "corpus_composition.json"
    quality = {
        "sae": NEURONPEDIA_ID,
        "hook_name": HOOK_NAME,
        "explained_variance": round(ev_of(is_eval), 4),
        "explained_variance_definition": "1 - sum((x - x_hat)^2) / sum((x - mean_eval(x))^2) over held-out tokens",
        "explained_variance_train": round(ev_of(~is_eval), 4),
        "explained_variance_eval_by_source": ev_by_source,
        "l0_mean": round(float(l0[is_eval].mean()), 3),
        "l0_max": int(l0[is_eval].max()),
        "k": cfg["k"],
        "d_in": cfg["d_in"],
        "d_sae": d_sae,
        "dead_fraction": round(n_dead_eval / d_sae, 4),
        "dead_definition": "never active on the held-out tokens",
        "dead_fraction_whole_corpus": round(n_dead_all / d_sae, 4),
        "dead_fraction_last_train_epoch": round(train_stats.get("never_fired_in_last_epoch", 0) / d_sae, 4),
        "median_log10_density_eval": round(float(torch.log10(dens_eval[dens_eval > 0]).median()), 3)
        if n_dead_eval < d_sae
        else None,
        "tokens": {
            "train": int((~is_eval).sum()),
            "eval": int(is_eval.sum()),
            "total": n,
            "forwarded_incl_dropped": harvest_info.get("tokens_forwarded"),
        },
        "training": {k: v for k, v in train_stats.items() if k != "history"},
        "training_curve": train_stats.get("history", [])[-5:],
        "harvest": harvest_info,
        "corpus": read_json(comp_path) if comp_path.is_file() else None,
        "labels": {"live": n_live, "unique": n_unique},
        "concepts": concepts,
    }
    if not math.isfinite(quality["explained_variance"]):
        raise RuntimeError("explained variance is not finite")
    # Only what the build determines: the same inputs give a byte-identical file (timings: .build/ markers).
    quality = without_timings(quality)
    write_json(sae_dir / QUALITY_FILE, quality)
    return {**quality, "seconds": round(time.monotonic() - t0, 1)}
