"""gap3d: VLM prompt latents -> patch-level image-encoder tokens -> frozen image-to-3D generator.

Implementation of GAP3D (arXiv 2605.28995) built around a cache-once feature store.
"""

__version__ = "0.1.0"
