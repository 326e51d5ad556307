"""The feature store: the contract between the cache pipeline and the trainer.

Nothing in this package imports ``gap3d.pipeline``, ``gap3d.trainer`` or ``gap3d.inference``;
they all import it. See :mod:`gap3d.store.feature_store` for the layout.
"""

from gap3d.store.feature_store import FeatureStore
from gap3d.store.location import StoreLocation
from gap3d.store.manifest import StoreError, StoreSpec
from gap3d.store.shard import ShardData

__all__ = ["FeatureStore", "ShardData", "StoreError", "StoreLocation", "StoreSpec"]
