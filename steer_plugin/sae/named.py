"""SAEs named the way people know them: an SAELens release + SAE id, or a Neuronpedia source (`model/source`).

The names come from the registry that the sae-lens package ships (`sae_lens/pretrained_saes.yaml`), read as data:
sae_lens itself is never imported (its dependencies are training stacks). Each entry names a Hugging Face Hub
repo (`repo_id`, per release), the SAE's folder or file in it (`path`, per SAE), its Neuronpedia source
(`neuronpedia`), the loader SAELens uses (`conversion_func`) and some loader settings (`norm_scaling_factor`,
`config_overrides`). `resolve_named` turns a name into a folder of the local Hugging Face cache that our format
loaders read, with `huggingface_hub.snapshot_download` limited to that folder:

- a copy already in the cache is used as is (no network, and every process of one server resolves the same
  commit as the first one that downloaded it);
- otherwise it is downloaded, unless HF_HUB_OFFLINE is set: then the error says what to download.

This runs when the configuration is loaded (start-up), never per request.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

SAE_LENS_PACKAGE = "sae_lens"
"""Package whose data file is the registry (module name, not imported)."""
SAE_LENS_PIN = "sae-lens==6.54.12"
"""The version the tests read; any recent sae-lens ships the same file layout."""
REGISTRY_FILE = "pretrained_saes.yaml"

CONVERSION_FORMATS: dict[str | None, str] = {
    None: "saelens",  # SAELens' own folder: cfg.json + sae_weights.safetensors
    "gemma_2": "gemma_scope",  # Gemma Scope 1: params.npz
    "gemma_3": "gemma_scope_2",  # Gemma Scope 2: config.json + params.safetensors
    "dictionary_learning_1": "dictionary_learning",  # ae.pt + config.json
    "llama_scope": "llama_scope",  # hyperparams.json + checkpoints/final.safetensors
    "goodfire": "goodfire",  # one .pth/.pt file
}
"""SAELens `conversion_func` (None: SAELens' own format) -> our format (steer_plugin.sae.FORMATS)."""

_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
_IGNORED_OVERRIDES = frozenset({"dataset_path"})  # training data: no bearing on inference
_CLOSE = 5


class NamedSAEError(ValueError):
    """A name could not be resolved; `field` is the config key at fault (`release`, `sae_id`, `neuronpedia`,
    `hub_revision`, or `format` for a registry entry we have no loader for)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RegistryEntry:
    """One SAE of the SAELens registry."""

    release: str
    """Release name (top-level key of the yaml)."""
    sae_id: str
    """SAE id within the release (`saes[].id`)."""
    repo_id: str
    """Hugging Face Hub model repo of the release."""
    path: str
    """Folder (or file) of this SAE inside the repo (`saes[].path`)."""
    conversion_func: str | None
    """SAELens loader of the release; None: SAELens' own format."""
    model: str
    """Model the SAE was trained on (as the registry names it)."""
    neuronpedia: str | None = None
    """Neuronpedia `model/source`, when the SAE is on Neuronpedia."""
    norm_scaling_factor: float | None = None
    """Dataset-wise input scale SAELens keeps in the registry, not in the SAE's config."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Release-wide overrides of the SAE's config."""

    @property
    def is_file(self) -> bool:
        """Whether `path` names one file (e.g. Goodfire's .pth) rather than a folder."""
        return PurePosixPath(self.path).suffix in _FILE_SUFFIXES


@dataclass(frozen=True)
class Registry:
    """The SAELens registry: release -> SAE id -> entry, and Neuronpedia source -> entry."""

    releases: dict[str, dict[str, RegistryEntry]]
    neuronpedia: dict[str, RegistryEntry]
    source: str
    """Where it was read from (file and sae-lens version), for messages."""

    def lookup(self, release: str, sae_id: str) -> RegistryEntry:
        saes = self.releases.get(release)
        if saes is None:
            raise NamedSAEError(
                "release",
                f"unknown SAELens release {release!r}{_close(release, self.releases)} ({self.source})",
            )
        entry = saes.get(sae_id)
        if entry is None:
            raise NamedSAEError(
                "sae_id",
                f"release {release!r} has no SAE id {sae_id!r}{_close(sae_id, saes)} ({self.source})",
            )
        return entry

    def by_neuronpedia(self, source: str) -> RegistryEntry:
        entry = self.neuronpedia.get(source)
        if entry is None:
            raise NamedSAEError(
                "neuronpedia",
                f"no SAE of the SAELens registry has Neuronpedia source {source!r}"
                f"{_close(source, self.neuronpedia)} ({self.source})",
            )
        return entry


@dataclass(frozen=True)
class ResolvedSAE:
    """A named SAE, found in the local Hugging Face cache."""

    entry: RegistryEntry
    local_path: str
    """The SAE's folder (or file) in the cache: `<cache>/models--org--name/snapshots/<commit>/<path>`."""
    commit: str
    """Commit of the repo the files belong to."""
    format: str
    """Our loader for it (from the registry's conversion_func)."""
    options: dict[str, str | int | float | bool]
    """Loader options the registry implies (the config's own `options` take precedence)."""

    @property
    def neuronpedia_id(self) -> str | None:
        return self.entry.neuronpedia

    def describe(self) -> str:
        """`repo@commit:path`, for logs and the compile-cache fingerprint."""
        return f"{self.entry.repo_id}@{self.commit}:{self.entry.path}"


def registry_file() -> Path:
    """The pretrained_saes.yaml of the installed sae-lens, located without importing sae_lens."""
    try:
        spec = importlib.util.find_spec(SAE_LENS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / REGISTRY_FILE
        if candidate.is_file():
            return candidate
    where = f" (no {REGISTRY_FILE} in {', '.join(locations)})" if locations else ""
    raise NamedSAEError(
        "release",
        "naming an SAE by `release`/`sae_id` or `neuronpedia` reads the SAE registry that the sae-lens package "
        f"ships, and sae-lens is not installed{where}. Install just its files: "
        f"pip install --no-deps {SAE_LENS_PIN}",
    )


def load_registry(path: str | Path | None = None) -> Registry:
    """The registry at `path` (default: the installed sae-lens's); parsed once per process and file."""
    file = Path(path) if path is not None else registry_file()
    return _load_registry(str(file))


@functools.cache
def _load_registry(file: str) -> Registry:
    try:
        import yaml
    except ImportError:
        raise NamedSAEError(
            "release", "reading the SAELens registry needs PyYAML: pip install pyyaml"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(file, encoding="utf-8") as f:
            data = yaml.load(f, Loader=loader)  # a safe loader (CSafeLoader when built)
    except (OSError, yaml.YAMLError) as err:
        raise NamedSAEError("release", f"cannot read the SAELens registry {file}: {err}") from None
    source = file
    try:
        source = f"{file}, sae-lens {importlib.metadata.version('sae-lens')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    if not isinstance(data, dict):
        raise NamedSAEError("release", f"the SAELens registry {file} does not hold a mapping of releases")
    releases: dict[str, dict[str, RegistryEntry]] = {}
    by_neuronpedia: dict[str, RegistryEntry] = {}
    for release, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("saes"), list) or "repo_id" not in value:
            continue  # not a release entry this reader understands
        overrides = value.get("config_overrides") or {}
        saes: dict[str, RegistryEntry] = {}
        for item in value["saes"]:
            if not isinstance(item, dict) or "id" not in item or "path" not in item:
                continue
            factor = item.get("norm_scaling_factor")
            entry = RegistryEntry(
                release=str(release),
                sae_id=str(item["id"]),
                repo_id=str(value["repo_id"]),
                path=str(item["path"]).strip("/"),  # SAELens writes int paths as their text
                conversion_func=value.get("conversion_func"),
                model=str(value.get("model", "")),
                neuronpedia=item.get("neuronpedia") or None,
                norm_scaling_factor=float(factor) if isinstance(factor, (int, float)) else None,
                config_overrides=dict(overrides) if isinstance(overrides, dict) else {},
            )
            saes[entry.sae_id] = entry
            if entry.neuronpedia:
                by_neuronpedia.setdefault(entry.neuronpedia, entry)
        releases[str(release)] = saes
    return Registry(releases, by_neuronpedia, source)


def registry_format(entry: RegistryEntry) -> tuple[str, dict[str, str | int | float | bool]]:
    """Our format for the entry and the loader options its registry settings imply; NamedSAEError (key
    `format`) for entries no loader of ours reads the way SAELens does."""
    where = f"{entry.release} / {entry.sae_id}"
    fmt = CONVERSION_FORMATS.get(entry.conversion_func)
    if fmt is None:
        known = ", ".join(sorted(str(k) for k in CONVERSION_FORMATS if k is not None))
        raise NamedSAEError(
            "format",
            f"{where}: SAELens loads this release with conversion_func {entry.conversion_func!r}, which no "
            f"steer_plugin format reads (supported: SAELens' own format and {known}); download the files and "
            "set `path` and `format` if one of ours fits",
        )
    if fmt == "gemma_scope_2" and "clt" in PurePosixPath(entry.path).parts[-1]:
        raise NamedSAEError("format", f"{where}: a cross-layer transcoder ({entry.path}), not an SAE")
    options: dict[str, str | int | float | bool] = {}
    if fmt == "saelens" and entry.norm_scaling_factor is not None:
        options["norm_scaling_factor"] = entry.norm_scaling_factor
    for key, value in entry.config_overrides.items():
        if key in _IGNORED_OVERRIDES:
            continue
        if fmt == "saelens" and key == "model_from_pretrained_kwargs" and isinstance(value, dict):
            unknown = sorted(set(value) - {"center_writing_weights"})
            if not unknown:
                if value.get("center_writing_weights") is True:
                    options["center_input"] = True
                continue
        if fmt == "saelens" and key == "normalize_activations" and isinstance(value, str):
            options["normalize_activations"] = value
            continue
        raise NamedSAEError(
            "format",
            f"{where}: the registry overrides the SAE's config with {key}={value!r}, which the {fmt!r} loader "
            "cannot apply",
        )
    return fmt, options


def resolve_named(
    *,
    release: str | None = None,
    sae_id: str | None = None,
    neuronpedia: str | None = None,
    revision: str | None = None,
    format: str | None = None,
    registry: Registry | None = None,
) -> ResolvedSAE:
    """The local files of the SAE named by `release` + `sae_id` or by `neuronpedia`, downloaded into the
    Hugging Face cache when missing and allowed (HF_HUB_OFFLINE unset). `revision`: branch, tag or commit of
    the repo (default main). `format`: the operator's choice of loader, instead of the registry's.
    NamedSAEError (with the config key at fault) otherwise."""
    try:
        return _resolve(release, sae_id, neuronpedia, revision, format, registry)
    except NamedSAEError as err:
        if neuronpedia is not None and err.field == "release":  # the key the operator wrote
            raise NamedSAEError("neuronpedia", str(err)) from None
        raise


def _resolve(
    release: str | None,
    sae_id: str | None,
    neuronpedia: str | None,
    revision: str | None,
    format: str | None,
    registry: Registry | None,
) -> ResolvedSAE:
    registry = registry or load_registry()
    if neuronpedia is not None:
        entry = registry.by_neuronpedia(neuronpedia)
    elif release is not None and sae_id is not None:
        entry = registry.lookup(release, sae_id)
    else:
        raise NamedSAEError("release", "name an SAE by `release` + `sae_id` or by `neuronpedia`")
    try:
        fmt, options = registry_format(entry)
    except NamedSAEError:
        if format is None:
            raise
        fmt, options = format, {}
    if format is not None and format != fmt:
        fmt, options = format, {}  # the operator's loader: the registry's settings were meant for another
    local, commit = _fetch(entry, revision, fmt)
    return ResolvedSAE(entry, str(local), commit, fmt, options)


def _fetch(entry: RegistryEntry, revision: str | None, fmt: str) -> tuple[Path, str]:
    """(the entry's folder or file in the cache, commit): the cached copy when complete, else a download."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise NamedSAEError(
            "release", "resolving SAEs by name needs huggingface_hub: pip install huggingface_hub"
        ) from None
    patterns = [entry.path] if entry.is_file else [f"{entry.path}/*"]
    what = f"{entry.repo_id} ({entry.path}, revision {revision or 'main'})"
    hint = f"hf download {entry.repo_id} --include '{patterns[0]}'" + (
        f" --revision {revision}" if revision else ""
    )
    try:
        snapshot = snapshot_download(
            entry.repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
        )
        found = _complete(Path(snapshot), entry, fmt)
        if found is not None:
            return found, Path(snapshot).name
    except LocalEntryNotFoundError:
        pass
    except Exception as err:  # a malformed cache
        raise NamedSAEError("release", f"{what}: cannot read the Hugging Face cache: {err}") from None
    if constants.HF_HUB_OFFLINE:
        raise NamedSAEError(
            "release",
            f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
            f"download it first ({hint}) or unset HF_HUB_OFFLINE",
        )
    try:
        snapshot = snapshot_download(entry.repo_id, revision=revision, allow_patterns=patterns)
    except Exception as err:
        field_ = "hub_revision" if type(err).__name__ == "RevisionNotFoundError" else "release"
        raise NamedSAEError(
            field_, f"{what}: cannot download into the Hugging Face cache: {type(err).__name__}: {err}"
        ) from None
    found = _complete(Path(snapshot), entry, fmt)
    if found is None:
        raise NamedSAEError(
            "release",
            f"{what}: the downloaded files at {Path(snapshot) / entry.path} are not a {fmt!r} SAE "
            "(the repo may have changed since the registry was written)",
        )
    return found, Path(snapshot).name


def _complete(snapshot: Path, entry: RegistryEntry, fmt: str) -> Path | None:
    """The entry's files in `snapshot` if they are there and make up a `fmt` SAE."""
    from .formats import REGISTRY

    target = snapshot / entry.path
    if not target.exists():
        return None
    loader = REGISTRY.get(fmt)
    if loader is not None and not loader.detect(target):
        return None
    return target


def _close(name: str, known: Any) -> str:
    matches = difflib.get_close_matches(name, list(known), n=_CLOSE, cutoff=0.6)
    if not matches:
        lowered = name.lower()
        matches = sorted(k for k in known if lowered in k.lower())[:_CLOSE]
    return f"; close matches: {', '.join(matches)}" if matches else "; no close match"
