"""Offline demo assets: SmolLM2-135M-Instruct (bf16 HF folder) and a TopK SAE on its layer-15 residual.

``ensure_assets()`` builds whatever is missing (see :mod:`steer_demo.build_assets`); ``steer-serve-demo``
(:mod:`steer_demo.serve`) serves them. A package of its own beside the runtime: it uses steer_plugin and
steer_adapters, they never import it (tests/test_import_boundary.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AssetPaths", "asset_paths", "ensure_assets"]

if TYPE_CHECKING:
    from .build_assets import AssetPaths, asset_paths, ensure_assets


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m steer_demo.build_assets` does not import the module twice.
    if name in __all__:
        from . import build_assets

        return getattr(build_assets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
