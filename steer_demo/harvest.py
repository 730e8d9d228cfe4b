"""Stage 3: residual-stream activations at ``blocks.15.hook_resid_post`` with HF transformers, fp32.

``blocks.L.hook_resid_post`` is the output of decoder layer L, i.e. HF ``hidden_states[L+1]`` of the full
model. To save compute the model is cut to its first L+1 layers and the output of layer L is taken with
a forward hook (NOT from ``hidden_states[-1]`` of the cut model: transformers replaces the last entry
with the final-RMSNorm output). A one-window check against the full model's ``hidden_states[L+1]``
guards this.

The corpus is packed into windows of ``CTX`` tokens (documents shuffled with a fixed seed, plain-text
documents separated by ``<|endoftext|>``, chat documents carry their own special tokens). Position 0 of
every window is the attention sink: its residual norm is ~100x the median (measured: ~24k vs ~173), so it
is dropped. The packed ``<|endoftext|>`` separators (and a few first-real-token positions) become sinks as
well, so every row with a norm above ``OUTLIER_NORM_FACTOR`` x the median is dropped too (~0.3%; mid-text
``<|im_start|>``/``<|im_end|>`` are normal, ~200). Statistics are recorded in the harvest info. The last ``EVAL_FRACTION`` of the
windows is held out for evaluation.

The forward passes run in ``build_workers()`` processes (all cores by default), each with one torch thread and
whole batches of ``BATCH_WINDOWS`` windows: every batch is computed exactly as a single process computes it, so
the activations are bit-for-bit the same whatever the number of cores.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .common import LAYER, SEED, Progress, build_workers, configure_threads, log
from .corpus import read_corpus

CTX = 128
BATCH_WINDOWS = 16
EVAL_FRACTION = 0.05
#: rows whose residual norm exceeds this multiple of the median are attention-sink outliers and dropped
OUTLIER_NORM_FACTOR = 4.0
ACTS_FILE = "activations.safetensors"


def pack_windows(docs, tok, ctx: int = CTX, seed: int = SEED):
    """Token windows [W, ctx] plus, per token, the index of the document it came from."""
    import torch

    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    doc_of: list[int] = []
    for i in order:
        d = docs[i]
        t = tok(d.text, add_special_tokens=False)["input_ids"]
        if not d.chat:
            t = t + [sep]
        ids.extend(t)
        doc_of.extend([i] * len(t))
    n_win = len(ids) // ctx
    windows = torch.tensor(ids[: n_win * ctx], dtype=torch.int32).view(n_win, ctx)
    window_docs = torch.tensor(doc_of[: n_win * ctx], dtype=torch.int32).view(n_win, ctx)
    return windows, window_docs


def build_activations(model_dir: Path, work: Path, layer: int = LAYER) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    docs = read_corpus(work)
    windows, window_docs = pack_windows(docs, tok)
    n_win = windows.shape[0]
    n_eval_win = max(1, round(EVAL_FRACTION * n_win))
    log(f"  packed {len(docs)} docs into {n_win} windows x {CTX} tokens ({n_eval_win} held out)")

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    captured: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        captured.append((out[0] if isinstance(out, tuple) else out).detach())

    # Check that the hook point is hidden_states[layer + 1] of the full model, then cut the model.
    with torch.inference_mode():
        h = model.model.layers[layer].register_forward_hook(hook)
        full = model.model(input_ids=windows[:1].long(), output_hidden_states=True).hidden_states[layer + 1]
        h.remove()
        ref = captured.pop()
        if not torch.allclose(full, ref, rtol=1e-5, atol=1e-4):
            raise RuntimeError("hooked layer output does not match hidden_states[layer+1]")
    d_model = model.config.hidden_size
    del model
    # Shared with the worker processes, which fill disjoint batches of windows.
    acts = torch.empty(n_win, CTX - 1, d_model, dtype=torch.float16).share_memory_()  # [W, CTX-1, d]
    pos0_norms = torch.empty(n_win).share_memory_()  # [W]
    done = torch.zeros(1, dtype=torch.int64).share_memory_()  # tokens forwarded so far (progress)
    workers = build_workers()
    log(f"  forwarding in {workers} process(es), 1 torch thread each")
    prog = Progress("harvest", total=n_win * CTX, unit="tok")
    context = torch.multiprocessing.get_context("spawn")  # never fork a process that ran OpenMP
    procs = [
        context.Process(
            target=_harvest_worker,
            args=(str(model_dir), layer, windows, rank, workers, acts, pos0_norms, done),
            daemon=True,
        )
        for rank in range(workers)
    ]
    for proc in procs:
        proc.start()
    while any(proc.is_alive() for proc in procs):
        time.sleep(1.0)
        prog.update(int(done[0]) - prog.n)
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"harvest worker failed (exit codes {[proc.exitcode for proc in procs]})")
    harvest_s = prog.done()

    # Norm statistics. Position 0 is already excluded; massive-norm rows elsewhere are dropped too.
    flat = acts.view(-1, d_model)
    norms = flat.float().norm(dim=-1)
    med = norms.median().item()
    limit = OUTLIER_NORM_FACTOR * med
    keep = norms <= limit
    tokens = windows[:, 1:].contiguous().view(-1)
    dropped_tokens: dict[str, int] = {}
    for t in tokens[~keep].tolist():
        s = tok.decode([t])
        dropped_tokens[s] = dropped_tokens.get(s, 0) + 1
    stats = {
        "pos0_norm_mean": round(pos0_norms.mean().item(), 1),
        "pos0_norm_min": round(pos0_norms.min().item(), 1),
        "norm_median": round(med, 2),
        "norm_p01": round(norms[::7].quantile(0.01).item(), 2),
        "norm_p99": round(norms[::7].quantile(0.99).item(), 2),
        "norm_max": round(norms.max().item(), 1),
        "outlier_rule": f"norm > {OUTLIER_NORM_FACTOR} x median ({limit:.1f})",
        "outliers_dropped": int((~keep).sum()),
        "outlier_tokens_top": dict(sorted(dropped_tokens.items(), key=lambda kv: -kv[1])[:10]),
        "kept_norm_max": round(norms[keep].max().item(), 2),
    }
    log(
        f"  residual norms: position 0 mean {stats['pos0_norm_mean']} (min {stats['pos0_norm_min']}) vs "
        f"median {stats['norm_median']} elsewhere (p99 {stats['norm_p99']}); position 0 dropped, and "
        f"{stats['outliers_dropped']} other massive-norm rows ({stats['outlier_rule']}), mostly "
        f"{list(stats['outlier_tokens_top'])[:3]}"
    )

    row_doc = window_docs[:, 1:].contiguous().view(-1)[keep]
    row_window = torch.arange(n_win, dtype=torch.int32).repeat_interleave(CTX - 1)[keep]
    row_pos = torch.arange(1, CTX, dtype=torch.int32).repeat(n_win)[keep]
    tokens = tokens[keep]
    flat = flat[keep]
    is_eval = (row_window >= n_win - n_eval_win).to(torch.uint8)

    work.mkdir(parents=True, exist_ok=True)
    out = work / ACTS_FILE
    tmp = out.with_name(out.name + ".tmp")
    save_file(
        {
            "acts": flat.contiguous(),
            "tokens": tokens,
            "row_doc": row_doc,
            "row_window": row_window,
            "row_pos": row_pos,
            "is_eval": is_eval,
            "windows": windows,
        },
        str(tmp),
        # One key: safetensors writes the metadata map in hash order, so two keys make rebuilds differ.
        metadata={"info": json.dumps({"ctx": CTX, "hook_name": f"blocks.{layer}.hook_resid_post"})},
    )
    tmp.replace(out)
    n_eval = int(is_eval.sum())
    info = {
        "layer": layer,
        "ctx": CTX,
        "windows": n_win,
        "tokens_forwarded": n_win * CTX,
        "rows": int(flat.shape[0]),
        "rows_train": int(flat.shape[0]) - n_eval,
        "rows_eval": n_eval,
        "dtype_stored": "float16",
        "compute_dtype": "float32",
        "harvest_seconds": round(harvest_s, 1),
        "tokens_per_second": round(n_win * CTX / max(harvest_s, 1e-9)),
        "norm_stats": stats,
        "seconds": round(time.monotonic() - t0, 1),
    }
    return info


def _harvest_worker(
    model_dir: str, layer: int, windows, rank: int, workers: int, acts, pos0_norms, done
) -> None:
    """Batches rank, rank + workers, ... of the windows through the first layer + 1 layers (one torch thread):
    each batch's residual after `layer` goes into the shared `acts` / `pos0_norms`."""
    import torch
    from transformers import AutoModelForCausalLM

    configure_threads()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: layer + 1]
    model.config.num_hidden_layers = layer + 1
    model.model.norm = torch.nn.Identity()  # not needed; saves a little work
    captured: list[torch.Tensor] = []
    model.model.layers[layer].register_forward_hook(
        lambda _mod, _inp, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())
    )
    starts = range(rank * BATCH_WINDOWS, windows.shape[0], workers * BATCH_WINDOWS)
    with torch.inference_mode():
        for b in starts:
            x = windows[b : b + BATCH_WINDOWS].long()  # [B, CTX]
            model.model(input_ids=x, use_cache=False)
            hs = captured.pop().float()  # [B, CTX, d]
            pos0_norms[b : b + len(x)] = hs[:, 0].norm(dim=-1)
            acts[b : b + len(x)] = hs[:, 1:].to(torch.float16)
            done += x.numel()


def load_activations(work: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(work / ACTS_FILE))
