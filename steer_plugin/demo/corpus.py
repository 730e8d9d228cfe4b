"""Stage 2: an offline, deterministic training corpus with topic variety.

Sources (everything is on the machine already; no network):

* ``chat``: the demo model's own answers to ~100 varied chat prompts (see :mod:`.prompts`), kept in the
  model's chat template, so the SAE sees the same kind of text the steering demo serves;
* ``python_docstrings``: docstrings of the Python standard library, parsed with :mod:`ast` from the
  stdlib sources (nothing is imported, so no side effects);
* ``python_reference``: the language-reference prose that ``pydoc`` ships (``pydoc_data.topics``);
* ``debian_docs``: plain-text package docs under ``/usr/share/doc`` (copyright, README, NEWS, changelogs),
  whatever exists, files sorted, paragraphs de-duplicated (license texts repeat a lot);
* ``licenses``: ``/usr/share/common-licenses``.

Documents are split into chunks, shuffled with a fixed seed per source and taken until each source's
token budget is met. The result is ``corpus.jsonl`` plus ``corpus_composition.json`` (sources, docs,
characters, tokens) for the README. Same machine + same packages => same corpus.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
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
    "debian_docs": 40_000,
    "licenses": 6_000,
}
GEN_MAX_NEW_TOKENS = 128
GEN_BATCH = 96  # upper bound; the answers are split into equal batches
CHUNK_CHARS = 1500
DEBIAN_FILE_CAP = 3000  # chars kept per /usr/share/doc file after de-duplication
DEBIAN_READ_CAP = 40_000  # bytes read per file

DEBIAN_NAME_RE = re.compile(r"^(copyright|readme.*|news.*|changelog.*|authors|thanks|todo.*)$", re.I)
DEBIAN_SKIP_EXT = {".html", ".htm", ".css", ".js", ".png", ".jpg", ".gif", ".svg", ".pdf", ".xml", ".json"}
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "_bundled"}


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


def stdlib_docstring_docs() -> list[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & STDLIB_SKIP_DIRS)
    )
    docs: list[Doc] = []
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        mod = ".".join(rel.parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts: list[str] = []
        mdoc = ast.get_docstring(tree)
        if mdoc:
            parts.append(f"Module {mod}\n\n{mdoc}")

        def visit(node: ast.AST, prefix: str, parts: list[str] = parts) -> None:
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
                        visit(child, qual, parts)

        visit(tree, mod)
        text = _norm_ws("\n\n".join(parts))
        if len(text) < 200:
            continue
        for i, chunk in enumerate(_chunks(text)):
            docs.append(Doc("python_docstrings", f"{mod}#{i}", chunk))
    return docs


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
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read(cap)
        else:
            with open(path, "rb") as f:
                raw = f.read(cap)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None
    return text if _is_plain_text(text) else None


def debian_doc_docs(seen: set[str], root: Path = Path("/usr/share/doc")) -> list[Doc]:
    if not root.is_dir():
        return []
    files: list[Path] = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file():
            continue
        base = p.name[:-3] if p.name.endswith(".gz") else p.name
        stem_ext = Path(base).suffix.lower()
        if stem_ext in DEBIAN_SKIP_EXT or not DEBIAN_NAME_RE.match(base):
            continue
        files.append(p)
    docs: list[Doc] = []
    for p in files:
        text = _read_text_file(p, DEBIAN_READ_CAP)
        if text is None:
            continue
        kept = _dedup_paragraphs(_norm_ws(text), seen, DEBIAN_FILE_CAP)
        if len(kept) < 120:
            continue
        name = str(p.relative_to(root))
        for i, chunk in enumerate(_chunks(kept)):
            docs.append(Doc("debian_docs", f"{name}#{i}", chunk))
    return docs


def license_docs(seen: set[str], root: Path = Path("/usr/share/common-licenses")) -> list[Doc]:
    if not root.is_dir():
        return []
    docs = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_file():
            continue
        text = _read_text_file(p, 200_000)
        if text is None:
            continue
        kept = _dedup_paragraphs(_norm_ws(text), seen, 10**9)
        for i, chunk in enumerate(_chunks(kept)):
            docs.append(Doc("licenses", f"{p.name}#{i}", chunk))
    return docs


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
    # bf16 for speed: this only produces text; activations are harvested later in fp32.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
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

    seen: set[str] = set()
    pools = {
        "python_docstrings": stdlib_docstring_docs,
        "python_reference": python_reference_docs,
        "licenses": lambda: license_docs(seen),  # licenses first, so Debian copyright files skip their copies
        "debian_docs": lambda: debian_doc_docs(seen),
    }
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
            "sampling": {**GEN_SAMPLING, "dtype": "bfloat16"},
            "seed": SEED,
            "seconds": round(t_gen, 1),
        },
        "total_docs": sum(len(v) for v in selected.values()),
        "total_tokens": sum(d.n_tokens for v in selected.values() for d in v),
        "seconds": round(time.monotonic() - t0, 1),
    }
    write_json(work / "corpus_composition.json", composition)
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
