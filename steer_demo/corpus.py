"""Stage 2: an offline, deterministic training corpus with topic variety.

Every source is pinned by a version: the demo model's own output, the Python standard library (the
interpreter's version), and files shipped inside pure-Python wheels that ``pyproject.toml`` pins exactly
(``TEXT_PACKAGES``), listed from each wheel's ``RECORD``. Nothing is read from the machine's own
documentation (``/usr/share``) or from caches, so the same packages give the same corpus on any machine.

* ``chat``: the demo model's own answers to ~100 varied chat prompts (see :mod:`.prompts`), kept in the
  model's chat template, so the SAE sees the same kind of text the steering demo serves;
* ``python_docstrings``: docstrings of the Python standard library, parsed with :mod:`ast` from the
  stdlib sources (nothing is imported, so no side effects);
* ``python_reference``: the language-reference prose that ``pydoc`` ships (``pydoc_data.topics``);
* ``package_docstrings``: docstrings of the pinned packages (``transformers`` outside its per-model
  folders, ``accelerate``, ``gguf``), parsed the same way;
* ``package_readmes``: the long descriptions (README) in the pinned wheels' ``METADATA``, HTML stripped;
* ``licenses``: the pinned wheels' license files and the interpreter's ``LICENSE.txt`` (license texts
  repeat, so paragraphs are de-duplicated across licenses and READMEs).

Documents are split into chunks, shuffled with a fixed seed per source and taken until each source's
token budget is met. The result is ``corpus.jsonl`` plus ``corpus_composition.json`` (sources, docs,
characters, tokens, package versions) for the README. Same packages + same Python => same corpus.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import platform
import random
import re
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import SEED, Progress, configure_threads, log, write_json
from .prompts import chat_prompts

#: token budgets per source (chat takes whatever the generations produce).
DEFAULT_BUDGETS = {
    "python_docstrings": 40_000,
    "python_reference": 20_000,
    "package_docstrings": 32_000,
    "package_readmes": 8_000,
    "licenses": 6_000,
}
GEN_MAX_NEW_TOKENS = 128
GEN_BATCH = 96  # upper bound; the answers are split into equal batches
#: float32, not the checkpoint's bf16: a CPU without bf16 arithmetic (AVX2 only, as CI's AMD EPYC) emulates
#: it ~5x slower (3.0 s against 0.54 s a decode step of 96 answers at one thread), and fp32 gives the same
#: text on every CPU kind more often than bf16's per-kernel rounding does.
GEN_DTYPE = "float32"
CHUNK_CHARS = 1500
LICENSE_READ_CAP = 200_000  # bytes read per license file

#: Pure-Python wheels (``py3-none-any``: the same files on every platform) whose shipped text is part of
#: the corpus. Each is pinned exactly (``==``) in pyproject.toml's ``hf`` extra (checked by tests/demo);
#: their versions are part of the corpus stage's fingerprint. Value: top-level folders skipped for
#: docstrings (transformers' ~400 per-model folders repeat one template; its library code is kept).
TEXT_PACKAGES: dict[str, tuple[str, ...]] = {
    "transformers": ("models",),
    "accelerate": (),
    "gguf": (),
}
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "_bundled"}
LICENSE_NAME_RE = re.compile(r"^(licen[cs]e|copying|notice)([.-].*)?$", re.I)


@dataclass
class Doc:
    source: str
    name: str
    text: str
    topic: str | None = None
    chat: bool = False
    n_tokens: int = 0


# ---------------------------------------------------------------- helpers


def _is_plain_text(s: str) -> bool:
    if not s.strip() or "\x00" in s:
        return False
    bad = sum(1 for ch in s if ord(ch) < 32 and ch not in "\n\t\r\f")
    return bad <= 0.001 * len(s)


def _norm_ws(s: str) -> str:
    s = s.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    s = "\n".join(line.rstrip() for line in s.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", s).strip()


def _chunks(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Split at paragraph boundaries into pieces of at most ~max_chars (long paragraphs are cut)."""
    buf: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 3 else max_chars
            if buf:
                yield "\n\n".join(buf)
                buf, size = [], 0
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        if size + len(para) > max_chars and buf:
            yield "\n\n".join(buf)
            buf, size = [], 0
        if para.strip():
            buf.append(para)
            size += len(para) + 2
    if buf:
        yield "\n\n".join(buf)


# ---------------------------------------------------------------- sources


def _docstring_text(tree: ast.Module, mod: str) -> str:
    """Module, public class and public function docstrings of one parsed file, with their qualified names."""
    parts: list[str] = []
    mdoc = ast.get_docstring(tree)
    if mdoc:
        parts.append(f"Module {mod}\n\n{mdoc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if child.name.startswith("_") and not child.name.startswith("__init__"):
                    continue
                qual = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and len(doc) > 40:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {qual}\n    {doc}")
                if isinstance(child, ast.ClassDef):
                    visit(child, qual)

    visit(tree, mod)
    return _norm_ws("\n\n".join(parts))


def _docstring_docs(source: str, files: list[tuple[str, Path]]) -> list[Doc]:
    """``files``: (dotted module name, path), in a fixed order."""
    docs: list[Doc] = []
    for mod, path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        text = _docstring_text(tree, mod)
        if len(text) < 200:
            continue
        for i, chunk in enumerate(_chunks(text)):
            docs.append(Doc(source, f"{mod}#{i}", chunk))
    return docs


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstring_docs() -> list[Doc]:
    root = stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)
    )
    mods = [(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"), p) for p in files]
    return _docstring_docs("python_docstrings", mods)


def python_version() -> str:
    """The interpreter whose stdlib and ``pydoc_data`` feed the corpus (part of the stage fingerprint)."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def _dist(name: str) -> importlib.metadata.Distribution:
    return importlib.metadata.distribution(name)


def text_package_versions() -> dict[str, str | None]:
    """Installed versions of ``TEXT_PACKAGES`` (None: missing; the source then contributes nothing)."""
    out: dict[str, str | None] = {}
    for name in TEXT_PACKAGES:
        try:
            out[name] = _dist(name).version
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _record_files(name: str) -> list[tuple[str, Path]]:
    """(path as the wheel's RECORD spells it, absolute path) of an installed distribution, sorted.

    Only files the wheel itself shipped: RECORD is written at install time from the wheel's own list, and
    files pip adds there (INSTALLER, REQUESTED, direct_url.json, RECORD) are never read as text.
    """
    try:
        dist = _dist(name)
    except importlib.metadata.PackageNotFoundError:
        return []
    rows = [(str(f).replace("\\", "/"), Path(str(f.locate()))) for f in dist.files or []]
    return sorted(rows)


def package_docstring_docs() -> list[Doc]:
    files: list[tuple[str, Path]] = []
    for name, skip in TEXT_PACKAGES.items():
        for rel, path in _record_files(name):
            parts = rel.split("/")
            if not rel.endswith(".py") or parts[0] != name or ".." in parts:
                continue
            if set(parts[1:-1]) & (set(skip) | STDLIB_SKIP_DIRS):
                continue
            files.append((".".join(parts).removesuffix(".py").removesuffix(".__init__"), path))
    return _docstring_docs("package_docstrings", files)


_HTML_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")


def _metadata_description(name: str) -> str | None:
    try:
        text = _dist(name).read_text("METADATA")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text or "\n\n" not in text:
        return None
    return text.split("\n\n", 1)[1]  # headers, blank line, then the long description (Metadata >= 2.1)


def package_readme_docs(seen: set[str]) -> list[Doc]:
    docs: list[Doc] = []
    for name in TEXT_PACKAGES:
        body = _metadata_description(name)
        if not body:
            continue
        body = _HTML_TAG_RE.sub("", _HTML_COMMENT_RE.sub("", body))
        kept = _dedup_paragraphs(_norm_ws(body), seen, 10**9)
        for i, chunk in enumerate(_chunks(kept)):
            docs.append(Doc("package_readmes", f"{name}/README#{i}", chunk))
    return docs


def license_files() -> list[tuple[str, Path]]:
    """(name, path): the pinned wheels' license files, then the interpreter's ``LICENSE.txt`` if it has one."""
    out: list[tuple[str, Path]] = []
    for name in TEXT_PACKAGES:
        for rel, path in _record_files(name):
            parts = rel.split("/")
            if parts[0].endswith(".dist-info") and LICENSE_NAME_RE.match(parts[-1]):
                out.append((f"{name}/{parts[-1]}", path))
    py_license = stdlib_root() / "LICENSE.txt"
    if py_license.is_file():
        out.append(("python/LICENSE.txt", py_license))
    return out


def python_reference_docs() -> list[Doc]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        return []
    docs = []
    for key in sorted(topics):
        text = _norm_ws(topics[key])
        for i, chunk in enumerate(_chunks(text)):
            docs.append(Doc("python_reference", f"{key}#{i}", chunk))
    return docs


def _read_text_file(path: Path, cap: int) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(cap)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if _is_plain_text(text) else None


def license_docs(seen: set[str]) -> list[Doc]:
    docs = []
    for name, path in license_files():
        text = _read_text_file(path, LICENSE_READ_CAP)
        if text is None:
            continue
        kept = _dedup_paragraphs(_norm_ws(text), seen, 10**9)
        for i, chunk in enumerate(_chunks(kept)):
            docs.append(Doc("licenses", f"{name}#{i}", chunk))
    return docs


def text_pools(seen: set[str] | None = None) -> dict:
    """Every non-chat source: name -> function returning its chunks (in this order; licenses first, so the
    READMEs skip their copies of license paragraphs)."""
    seen = set() if seen is None else seen
    return {
        "python_docstrings": stdlib_docstring_docs,
        "python_reference": python_reference_docs,
        "licenses": lambda: license_docs(seen),
        "package_readmes": lambda: package_readme_docs(seen),
        "package_docstrings": package_docstring_docs,
    }


def source_versions() -> dict:
    """What the non-chat text depends on (recorded in the composition and the corpus stage fingerprint)."""
    return {"python": python_version(), "packages": text_package_versions()}


def _dedup_paragraphs(text: str, seen: set[str], cap: int) -> str:
    out: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        key = hashlib.sha1(re.sub(r"\W+", " ", para).strip().lower().encode()).hexdigest()
        if key in seen or len(para.strip()) < 3:
            continue
        seen.add(key)
        out.append(para)
        size += len(para)
        if size >= cap:
            break
    return "\n\n".join(out)


GEN_SAMPLING = {"temperature": 0.7, "top_k": 50, "repetition_penalty": 1.1}


def sample_batch(model, input_ids, attention_mask, max_new: int, gen, eos_id: int, pad_id: int):
    """Batched sampling with a KV cache: repetition penalty, temperature, top-k, explicit generator.

    A small loop instead of ``model.generate``: HF's samplers spend about half of each step on
    full-vocabulary sorting and exponential draws; drawing from the top-k only makes a step ~2x faster
    and the result depends on nothing but ``gen``. Left-padded prompts.
    """
    import torch
    from transformers import DynamicCache

    temperature = GEN_SAMPLING["temperature"]
    top_k = GEN_SAMPLING["top_k"]
    rep = GEN_SAMPLING["repetition_penalty"]
    n = input_ids.shape[0]
    pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    seen = input_ids.clone()
    done = torch.zeros(n, dtype=torch.bool)
    toks = []
    for _ in range(max_new):
        logits = out.logits[:, -1].float()
        prev = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(prev < 0, prev * rep, prev / rep))
        vals, idx = (logits / temperature).topk(top_k, dim=-1)
        nxt = idx.gather(1, torch.multinomial(torch.softmax(vals, -1), 1, generator=gen))
        nxt = torch.where(done[:, None], torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        done |= nxt[:, 0] == eos_id
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones(n, 1, dtype=attention_mask.dtype)], 1)
        pos = pos[:, -1:] + 1
        seen = torch.cat([seen, nxt], 1)
        out = model(
            input_ids=nxt,
            attention_mask=attention_mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
    return torch.cat(toks, 1)


def chat_docs(model_dir: Path) -> list[Doc]:
    """The demo model's own answers, sampled with a fixed seed, in the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, GEN_DTYPE)).eval()
    pairs = chat_prompts()
    docs: list[Doc] = []
    prog = Progress("generate", total=len(pairs), unit="answers", every_s=0.0)
    gen = torch.Generator().manual_seed(SEED)
    n_batches = -(-len(pairs) // GEN_BATCH)
    per = -(-len(pairs) // n_batches)  # equal-sized batches
    sample_no: dict[str, int] = {}
    with torch.inference_mode():
        for b in range(0, len(pairs), per):
            batch = pairs[b : b + per]
            prompts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for _, p in batch
            ]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            configure_threads()
            out = sample_batch(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                GEN_MAX_NEW_TOKENS,
                gen,
                eos_id,
                tok.pad_token_id,
            )
            for (topic, prompt), full_prompt, ids in zip(batch, prompts, out, strict=True):
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                text = f"{full_prompt}{answer}<|im_end|>\n"
                sample_no[prompt] = sample_no.get(prompt, 0) + 1
                docs.append(Doc("chat", f"{prompt} #{sample_no[prompt]}", text, topic=topic, chat=True))
            prog.update(len(batch))
    prog.done()
    del model
    return docs


# ---------------------------------------------------------------- assembly


def _take_budget(docs: list[Doc], budget: int, tok, seed: int) -> list[Doc]:
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    taken: list[Doc] = []
    total = 0
    for i in order:
        if total >= budget:
            break
        d = docs[i]
        d.n_tokens = len(tok(d.text, add_special_tokens=False)["input_ids"])
        taken.append(d)
        total += d.n_tokens
    return taken


def build_corpus(model_dir: Path, work: Path, budgets: dict[str, int] | None = None) -> dict:
    from transformers import AutoTokenizer

    budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    t0 = time.monotonic()

    log("  generating chat answers with the demo model ...")
    chat = chat_docs(model_dir)
    for d in chat:
        d.n_tokens = len(tok(d.text, add_special_tokens=False)["input_ids"])
    t_gen = time.monotonic() - t0

    pools = text_pools()
    selected: dict[str, list[Doc]] = {"chat": chat}
    available: dict[str, int] = {"chat": len(chat)}
    for i, (name, fn) in enumerate(pools.items()):
        t1 = time.monotonic()
        pool = fn()
        available[name] = len(pool)
        selected[name] = _take_budget(pool, budgets.get(name, 0), tok, SEED + 1 + i)
        n_tok = sum(d.n_tokens for d in selected[name])
        log(
            f"  source {name}: {len(pool)} chunks available, took {len(selected[name])} "
            f"({n_tok} tokens) in {time.monotonic() - t1:.1f}s"
        )

    work.mkdir(parents=True, exist_ok=True)
    out = work / "corpus.jsonl"
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for docs in selected.values():
            for d in docs:
                f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")
    tmp.replace(out)

    composition = {
        "sources": {
            name: {
                "docs": len(docs),
                "chunks_available": available[name],
                "chars": sum(len(d.text) for d in docs),
                "tokens": sum(d.n_tokens for d in docs),
                "budget_tokens": budgets.get(name),
            }
            for name, docs in selected.items()
        },
        "chat_topics": _count(d.topic for d in chat),
        "chat_generation": {
            "prompts": len(chat),
            "max_new_tokens": GEN_MAX_NEW_TOKENS,
            "sampling": {**GEN_SAMPLING, "dtype": GEN_DTYPE},
            "seed": SEED,
        },
        "text_sources": source_versions(),
        "total_docs": sum(len(v) for v in selected.values()),
        "total_tokens": sum(d.n_tokens for v in selected.values() for d in v),
    }
    # The file holds only what the build determines (byte-identical rebuilds); timings go to the stage marker.
    write_json(work / "corpus_composition.json", composition)
    composition = {**composition, "seconds": round(time.monotonic() - t0, 1)}
    composition["chat_generation"] = {**composition["chat_generation"], "seconds": round(t_gen, 1)}
    sample = next((d for d in chat if d.topic == "bridge"), None)
    if sample:
        log(f"  sample bridge answer: {sample.text.split('assistant', 1)[-1].strip()[:200]!r}")
    return composition


def _count(items: Iterator[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return dict(sorted(out.items()))


def read_corpus(work: Path) -> list[Doc]:
    with open(work / "corpus.jsonl", encoding="utf-8") as f:
        return [Doc(**json.loads(line)) for line in f]
