"""Stage 6: automatic feature labels from top-activating tokens and contexts.

For every latent the ``TOP_N`` largest activations over the whole harvested corpus (train + held-out)
are collected. ``top_tokens`` groups them by token (count, mean activation; ordered by summed
activation), ``top_contexts`` shows a few of them in context with the token marked «like this».
The ``label`` is the one or two dominant tokens ("Bridge / bridge"); when several latents end up with
the same label, all but the densest get the most common neighbouring token appended
("Bridge (Gate)") and ``unique`` says whether the final label is unique. Dead latents
(never active on the corpus) get ``label: null``.

Concept probes look for a latent by topic (e.g. the ``bridge`` chat prompts: Golden Gate Bridge / San
Francisco / bridges) in two ways: latents whose label or top tokens name the concept, and latents whose
activation mass concentrates on the topic's documents.
"""

from __future__ import annotations

import re
from collections import Counter

TOP_N = 64
N_TOP_TOKENS = 6
N_CONTEXTS = 5
CTX_BEFORE = 14
CTX_AFTER = 4

#: topic = chat-prompt topic in the corpus; word_tokens = the concept's own tokens (stripped, any case);
#: words = what to look for in labels.
CONCEPTS = {
    "bridge": {
        "topic": "bridge",
        "word_tokens": ("bridge", "bridges"),
        "words": ("bridge", "golden", "gate"),
    },
}


def token_str(tok, t: int) -> str:
    return tok.decode([int(t)])


def display_token(s: str) -> str:
    """Readable form of a token for labels: stripped, whitespace tokens spelled out."""
    st = s.strip()
    if st:
        return st
    if "\n" in s:
        return "\\n" * min(s.count("\n"), 3)
    if "\t" in s:
        return "\\t"
    return "␣" if s else "∅"


def build_labels(vals, idx, tokens, row_window, row_pos, windows, tok, d_sae: int) -> dict:
    """``vals``/``idx`` [N, k] sparse codes; ``tokens``/``row_window``/``row_pos`` [N]; ``windows`` [W, ctx]."""
    import numpy as np

    n_rows = vals.shape[0]
    v = vals.numpy().reshape(-1)
    f = idx.numpy().reshape(-1).astype(np.int64)
    r = np.repeat(np.arange(n_rows, dtype=np.int64), vals.shape[1])
    live = v > 0
    v, f, r = v[live], f[live], r[live]
    order = np.lexsort((-v, f))
    v, f, r = v[order], f[order], r[order]
    counts = np.bincount(f, minlength=d_sae)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tokens_np = tokens.numpy()
    win_np = windows.numpy()
    rw = row_window.numpy()
    rp = row_pos.numpy()
    decode_cache: dict[int, str] = {}

    def ts(t: int) -> str:
        if t not in decode_cache:
            decode_cache[t] = token_str(tok, t)
        return decode_cache[t]

    feats: list[dict] = []
    for j in range(d_sae):
        c = int(counts[j])
        if c == 0:
            feats.append(
                {
                    "index": j,
                    "label": None,
                    "unique": None,
                    "density": 0.0,
                    "top_tokens": [],
                    "top_contexts": [],
                }
            )
            continue
        s = int(starts[j])
        tv, tr = v[s : s + min(c, TOP_N)], r[s : s + min(c, TOP_N)]
        agg: dict[int, list[float]] = {}
        for a, row in zip(tv.tolist(), tr.tolist(), strict=True):
            agg.setdefault(int(tokens_np[row]), []).append(a)
        ranked = sorted(agg.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
        top_tokens = [
            {"token": ts(t), "count": len(a), "mean_act": round(float(np.mean(a)), 3)}
            for t, a in ranked[:N_TOP_TOKENS]
        ]
        # label: dominant token, plus the runner-up when it carries a comparable share
        mass = [sum(a) for _, a in ranked]
        names: list[str] = []
        label_mass = 0.0
        for (t, _a), m in zip(ranked, mass, strict=True):
            if len(names) == 2 or (names and m < 0.35 * mass[0]):
                break
            name = display_token(ts(t))
            if name.lower() not in {n.lower() for n in names}:
                names.append(name)
        label_lower = {n.lower() for n in names}
        for (t, _a), m in zip(ranked, mass, strict=True):
            if _same_word(display_token(ts(t)), label_lower):
                label_mass += m
        extra = [display_token(ts(t)) for t, _ in ranked[len(names) : N_TOP_TOKENS + 2]]
        contexts = []
        seen_windows: set[int] = set()
        prev_counter: Counter[str] = Counter()
        next_counter: Counter[str] = Counter()
        for a, row in zip(tv.tolist(), tr.tolist(), strict=True):
            w, p = int(rw[row]), int(rp[row])
            if p > 0:
                prev_counter[display_token(ts(int(win_np[w, p - 1])))] += 1
            if p + 1 < win_np.shape[1]:
                next_counter[display_token(ts(int(win_np[w, p + 1])))] += 1
            if w in seen_windows or len(contexts) >= N_CONTEXTS:
                continue
            seen_windows.add(w)
            before = tok.decode(win_np[w, max(0, p - CTX_BEFORE) : p].tolist())
            after = tok.decode(win_np[w, p + 1 : p + 1 + CTX_AFTER].tolist())
            contexts.append({"text": f"{before}«{ts(int(win_np[w, p]))}»{after}", "act": round(a, 3)})
        feats.append(
            {
                "index": j,
                "label": " / ".join(names),
                "unique": True,
                "label_purity": round(label_mass / sum(mass), 3),
                "density": c / n_rows,
                "max_act": round(float(tv[0]), 3),
                "top_tokens": top_tokens,
                "top_contexts": contexts,
                "_candidates": extra
                + [f"after {x}" for x, _ in prev_counter.most_common(3)]
                + [f"before {x}" for x, _ in next_counter.most_common(3)],
            }
        )

    _disambiguate(feats)
    for ft in feats:
        ft.pop("_candidates", None)
    return {"features": feats, "counts": counts}


def _same_word(name: str, words: set[str]) -> bool:
    """'bridges' counts as 'bridge' (and 'Bridge'): case and a plural s are ignored."""
    n = name.lower()
    return any(n == w or n.rstrip("s") == w.rstrip("s") for w in words)


def _disambiguate(feats: list[dict]) -> None:
    """Several latents with one label: the purest keeps it, the others get a distinguishing suffix."""
    groups: dict[str, list[dict]] = {}
    for ft in feats:
        if ft["label"] is not None:
            groups.setdefault(ft["label"].lower(), []).append(ft)
    taken = {ft["label"].lower() for ft in feats if ft["label"] is not None}
    for base, group in groups.items():
        if len(group) < 2:
            continue
        group.sort(key=lambda ft: (-ft["label_purity"], -ft["density"], ft["index"]))
        words = {w.strip() for w in base.split(" / ")}
        for ft in group[1:]:
            for cand in ft["_candidates"]:
                core = cand.split(" ", 1)[1] if cand.startswith(("after ", "before ")) else cand
                if _same_word(core, words) or not any(ch.isalnum() for ch in core):
                    continue
                new = f"{ft['label']} ({cand})"
                if new.lower() not in taken:
                    ft["label"] = new
                    taken.add(new.lower())
                    break
    final = Counter(ft["label"].lower() for ft in feats if ft["label"] is not None)
    for ft in feats:
        if ft["label"] is not None:
            ft["unique"] = final[ft["label"].lower()] == 1


def concept_probe(feats: list[dict], vals, idx, tokens, row_topic, spec: dict, top: int = 6) -> dict:
    """Latents for a concept, scored three ways.

    * by word: the concept's own tokens (e.g. " bridge", " Bridge", " bridges"); ``word_precision`` = share of
      the latent's activation mass on those tokens, ``word_recall`` = share of their occurrences on which
      it fires; ranked by precision x recall x topic mass fraction (below), ``best`` first: a latent for the
      concept, not one that merely includes the word, nor one of a narrower context of it (these can score within a
      fraction of a percent of each other on precision x recall alone: one machine's build picked one, the next
      the other);
    * by topic: share of the latent's activation mass on the topic's documents, and their coverage;
    * by name: latents whose label mentions one of ``spec["words"]``.
    """
    import torch

    d_sae = len(feats)
    flat_idx = idx.reshape(-1).long()
    v = vals.float()
    mass_all = torch.zeros(d_sae).index_add_(0, flat_idx, v.reshape(-1)).clamp_min(1e-9)

    def stats(row_mask):
        n_rows = int(row_mask.sum())
        i = idx[row_mask].reshape(-1).long()
        vv = v[row_mask].reshape(-1)
        m = torch.zeros(d_sae).index_add_(0, i, vv)
        act = torch.zeros(d_sae).index_add_(0, i, (vv > 0).float())
        return n_rows, m / mass_all, act / max(1, n_rows)

    words = {w.lower() for w in spec["word_tokens"]}
    from_tok = spec["decode"]
    uniq = torch.unique(tokens)
    word_ids = [int(t) for t in uniq.tolist() if from_tok(int(t)).strip().lower() in words]
    on_word = (
        torch.isin(tokens, torch.tensor(word_ids, dtype=tokens.dtype))
        if word_ids
        else torch.zeros_like(tokens, dtype=torch.bool)
    )
    on_topic = torch.tensor([t == spec["topic"] for t in row_topic], dtype=torch.bool)
    n_word, w_prec, w_rec = stats(on_word)
    n_topic, t_prec, t_rec = stats(on_topic)

    def entry(j: int) -> dict:
        return {
            "index": j,
            "label": feats[j]["label"],
            "density": round(feats[j]["density"], 6),
            "word_precision": round(float(w_prec[j]), 3),
            "word_recall": round(float(w_rec[j]), 3),
            "topic_mass_fraction": round(float(t_prec[j]), 3),
            "topic_token_coverage": round(float(t_rec[j]), 4),
        }

    word_score = w_prec * w_rec * t_prec
    by_word = [
        entry(j) for j in torch.argsort(word_score, descending=True)[:top].tolist() if word_score[j] > 0
    ]
    topic_score = t_prec * t_rec.sqrt()
    by_topic = [entry(j) for j in torch.argsort(topic_score, descending=True)[:top].tolist()]
    pat = re.compile("|".join(re.escape(w) for w in spec["words"]), re.I)
    by_name = [entry(ft["index"]) for ft in feats if ft["label"] is not None and pat.search(ft["label"])]
    by_name.sort(
        key=lambda e: (-e["word_precision"] * e["word_recall"], -e["topic_mass_fraction"], e["index"])
    )
    best = by_word[0] if by_word else (by_name[0] if by_name else None)
    return {
        "word_tokens": sorted({from_tok(t) for t in word_ids}),
        "word_token_count": n_word,
        "topic": spec["topic"],
        "topic_tokens": n_topic,
        "best": best,
        "by_word": by_word,
        "by_topic": by_topic,
        "by_name": by_name[:12],
    }
