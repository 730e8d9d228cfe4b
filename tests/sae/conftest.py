"""Shared fixtures for the SAE tests: seeded random tensors and the reference libraries.

The reference libraries (sae-lens, eai-sparsify, dictionary-learning; see requirements/test-extra.txt) are
installed with --no-deps: their package __init__ pulls in training stacks (datasets, wandb, nnsight,
transformer_lens) that the encode/decode code does not need. `import_isolated` imports just the modules we
compare against, bypassing the package __init__, and puts sys.modules back afterwards. Tests that use them
skip when the library is missing or its modules no longer import that way.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import types
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import pytest
import torch

from ..tools import skip_or_fail

D_IN = 16
D_SAE = 48


@pytest.fixture
def rand() -> Callable[..., torch.Tensor]:
    """rand(*shape, scale=1.0): seeded float32 normal samples, fresh per test."""
    gen = torch.Generator().manual_seed(1234)

    def sample(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    return sample


@pytest.fixture
def x(rand) -> torch.Tensor:
    """A batch of residual activations [2, 5, d_in], with a non-zero mean per token."""
    return rand(2, 5, D_IN, scale=2.0) + 0.5


def import_isolated(
    package: str,
    modules: Iterable[str],
    *,
    attrs: dict | None = None,
    stubs: dict[str, types.ModuleType] | None = None,
) -> dict[str, types.ModuleType]:
    """Import `modules` of `package` without running `package/__init__.py`; skip the test if that fails.

    attrs: attributes the stand-in package module needs (e.g. __version__).
    stubs: stand-in modules for heavy third-party imports the wanted modules name but do not use for maths.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError, AttributeError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail(f"reference library {package!r} is not installed (requirements/test-extra.txt)")
    stubs = stubs or {}
    owned = (package, *stubs)

    def is_owned(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in owned)

    saved = {k: v for k, v in sys.modules.items() if is_owned(k)}
    try:
        stand_in = types.ModuleType(package)
        stand_in.__path__ = list(spec.submodule_search_locations)
        for name, value in (attrs or {}).items():
            setattr(stand_in, name, value)
        sys.modules[package] = stand_in
        sys.modules.update(stubs)
        return {name: importlib.import_module(name) for name in modules}
    except Exception as e:  # version drift in the reference library: compare where we can, skip elsewhere
        skip_or_fail(f"cannot import {package} modules without its package __init__: {type(e).__name__}: {e}")
    finally:
        for key in [k for k in sys.modules if is_owned(k)]:
            del sys.modules[key]
        sys.modules.update(saved)


def _transformer_lens_stubs() -> dict[str, types.ModuleType]:
    """HookPoint / HookedRootModule stand-ins: identity modules, as TransformerLens' are without hooks."""
    from torch import nn

    class HookPoint(nn.Module):
        def forward(self, x):
            return x

    class HookedRootModule(nn.Module):
        def setup(self):
            pass

    root = types.ModuleType("transformer_lens")
    root.__path__ = []
    hook_points = types.ModuleType("transformer_lens.hook_points")
    hook_points.HookPoint = HookPoint
    hooked = types.ModuleType("transformer_lens.HookedTransformer")
    hooked.HookedRootModule = HookedRootModule
    return {
        "transformer_lens": root,
        "transformer_lens.hook_points": hook_points,
        "transformer_lens.HookedTransformer": hooked,
    }


@pytest.fixture(scope="session")
def saelens_ref() -> SimpleNamespace:
    """SAELens' SAE classes and pretrained-SAE converters (sae-lens, installed with --no-deps)."""
    try:
        version = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        skip_or_fail("reference library sae-lens is not installed (requirements/test-extra.txt)")
    names = ("standard_sae", "topk_sae", "jumprelu_sae", "gated_sae")
    mods = import_isolated(
        "sae_lens",
        ["sae_lens.registry", "sae_lens.saes.sae", *(f"sae_lens.saes.{n}" for n in names)]
        + ["sae_lens.loading.pretrained_sae_loaders"],
        attrs={"__version__": version, "logger": logging.getLogger("sae_lens")},
        stubs=_transformer_lens_stubs() if importlib.util.find_spec("transformer_lens") is None else {},
    )
    registry = mods["sae_lens.registry"]
    for arch, module, cls in (
        ("standard", "standard_sae", "StandardSAE"),
        ("topk", "topk_sae", "TopKSAE"),
        ("jumprelu", "jumprelu_sae", "JumpReLUSAE"),
        ("gated", "gated_sae", "GatedSAE"),
    ):
        if arch not in registry.SAE_CLASS_REGISTRY:  # the package __init__ we bypassed does this
            mod = mods[f"sae_lens.saes.{module}"]
            registry.register_sae_class(arch, getattr(mod, cls), getattr(mod, cls + "Config"))
    return SimpleNamespace(
        SAE=mods["sae_lens.saes.sae"].SAE, loaders=mods["sae_lens.loading.pretrained_sae_loaders"]
    )


@pytest.fixture(scope="session")
def sparsify_ref() -> SimpleNamespace:
    """EleutherAI sparsify's SparseCoder (eai-sparsify, installed with --no-deps)."""
    mods = import_isolated("sparsify", ["sparsify.sparse_coder"])
    return SimpleNamespace(SparseCoder=mods["sparsify.sparse_coder"].SparseCoder)


@pytest.fixture(scope="session")
def dictionary_learning_ref() -> SimpleNamespace:
    """dictionary_learning's dictionary classes (dictionary-learning, installed with --no-deps)."""
    mods = import_isolated(
        "dictionary_learning",
        [
            "dictionary_learning.dictionary",
            "dictionary_learning.trainers.top_k",
            "dictionary_learning.trainers.batch_top_k",
        ],
    )
    dictionary = mods["dictionary_learning.dictionary"]
    return SimpleNamespace(
        AutoEncoder=dictionary.AutoEncoder,
        GatedAutoEncoder=dictionary.GatedAutoEncoder,
        JumpReluAutoEncoder=dictionary.JumpReluAutoEncoder,
        AutoEncoderTopK=mods["dictionary_learning.trainers.top_k"].AutoEncoderTopK,
        BatchTopKSAE=mods["dictionary_learning.trainers.batch_top_k"].BatchTopKSAE,
    )
