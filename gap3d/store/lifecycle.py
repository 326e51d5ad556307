"""Creating a store and loading its manifest, the same way on local disks and object stores.

Creation writes the root group with a "creating" flag, then every array, then the manifest
(root attributes) last: a store without a manifest was never finished and refuses to open. No
rename is involved (object stores have none), and nothing a writer commits can exist before
the manifest does, so an unfinished store can simply be created again.
"""

from __future__ import annotations

from typing import Any

import zarr

from gap3d import __version__
from gap3d.store.location import StoreLocation
from gap3d.store.manifest import (
    FORMAT_NAME,
    MANIFEST_KEY,
    SCHEMA_VERSION,
    StoreError,
    StoreSpec,
    build_manifest,
)
from gap3d.store.schema import create_arrays

CREATING_KEY = "gap3d_creating"


def broken(location: StoreLocation | str, what: str) -> StoreError:
    return StoreError(
        f"{location}: {what}. If a run was interrupted while creating it, delete it and "
        "re-run; otherwise point the command at a different store path."
    )


def create_store(location: StoreLocation, spec: StoreSpec, overwrite: bool = False) -> None:
    """Create an empty store at ``location``; refuses a location that holds anything unless
    ``overwrite`` (used only to restart an unfinished creation)."""
    if not overwrite and location.exists():
        raise StoreError(
            f"{location} already exists; open it with FeatureStore.open / open_or_create, or "
            "choose a new store path"
        )
    store = location.open_zarr_store()
    try:
        group = zarr.open_group(
            store=store, mode="w", zarr_format=3, attributes={CREATING_KEY: True}
        )
    except FileNotFoundError as e:  # object stores: the bucket itself is missing
        bucket = location.path.split("/", 1)[0]
        raise StoreError(
            f"cannot create {location}: {e}. Create the bucket '{bucket}' first (gap3d never "
            "creates buckets), or check the endpoint (AWS_ENDPOINT_URL) and credentials"
        ) from e
    layout = create_arrays(group, spec)
    group.create_group("commits")
    # The manifest goes in last: a store without it was never finished.
    group.update_attributes({MANIFEST_KEY: build_manifest(spec, layout), CREATING_KEY: False})


def read_root_attrs(location: StoreLocation, store: Any) -> dict[str, Any]:
    """The root group's attributes; clear errors for a missing store or a non-store."""
    try:
        group = zarr.open_group(store=store, mode="r", zarr_format=3)
    except FileNotFoundError:
        if location.exists():
            raise StoreError(
                f"{location} is not a gap3d feature store (no zarr.json in it)"
            ) from None
        raise StoreError(
            f"{location}: no such feature store (run `gap3d cache` to create it)"
        ) from None
    except Exception as e:  # zarr raises many types for damaged metadata
        raise broken(
            location, f"cannot read the Zarr group metadata ({type(e).__name__}: {e})"
        ) from e
    return group.attrs.asdict()


def load_manifest(location: StoreLocation, store: Any) -> dict[str, Any]:
    """The manifest of the store; a clear ``StoreError`` for anything else."""
    attrs = read_root_attrs(location, store)
    m = attrs.get(MANIFEST_KEY)
    if m is None:
        if attrs.get(CREATING_KEY):
            raise broken(location, "the store was never finished (creation was interrupted)")
        raise StoreError(f"{location} is a Zarr group but not a gap3d feature store (no manifest)")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise StoreError(f"{location} is not a gap3d feature store (manifest format mismatch)")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{location} has store schema_version {m.get('schema_version')!r}, this gap3d "
            f"{__version__} reads schema_version {SCHEMA_VERSION}. Re-create the store "
            "with this version (`gap3d cache` to a new store.path) or use a matching gap3d."
        )
    return m


def unfinished(location: StoreLocation, store: Any) -> bool:
    """True when the location holds a store whose creation never finished."""
    try:
        attrs = read_root_attrs(location, store)
    except StoreError:
        return False
    return MANIFEST_KEY not in attrs and bool(attrs.get(CREATING_KEY))
