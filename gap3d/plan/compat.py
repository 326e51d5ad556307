"""Store entry points whose home moves with the store rework, looked up in one place.

The store's array layout (``array_layout``, ``FEATURE_ARRAYS``) lives in
``gap3d.store.schema`` on newer trees and in ``gap3d.store.files`` on older ones; a separate
statistics pass (``FeatureStore.finalize``) exists only where statistics are not merged from
per-shard moments.
"""

from __future__ import annotations

from typing import Any


def store_schema() -> tuple[Any, tuple[str, ...]]:
    """``(array_layout, FEATURE_ARRAYS)`` of the installed store package."""
    try:
        from gap3d.store.schema import FEATURE_ARRAYS, array_layout
    except ImportError:
        from gap3d.store.files import FEATURE_ARRAYS, array_layout  # type: ignore[no-redef]
    return array_layout, tuple(FEATURE_ARRAYS)


def has_statistics_pass(store: Any) -> bool:
    """Does this store compute its statistics in a pass over the tokens (``finalize``)?"""
    return callable(getattr(store, "finalize", None))
