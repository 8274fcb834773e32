"""fxsparse.codegen: Triton kernels specialised per layer shape, autotuned once and cached on disk.

``FXSPARSE_KERNELS=auto|triton|torch`` picks the implementation at call time (see ``autotune``);
:func:`cache_stats` counts kernel-cache look-ups in this process, :func:`tuned_records` lists what was
picked, :func:`clear_cache` empties ``$FXSPARSE_CACHE_DIR/kernels``.
"""

from fxsparse.codegen.autotune import kernels_mode, tuned_records
from fxsparse.codegen.cache import CacheWarning, cache_dir, cache_stats, clear_cache, reset_cache_stats

__all__ = ["CacheWarning", "cache_dir", "cache_stats", "clear_cache", "reset_cache_stats", "kernels_mode",
           "tuned_records"]
