"""fxsparse.codegen: Triton kernels specialised per layer shape, autotuned once and cached on disk.

``FXSPARSE_KERNELS=auto|triton|torch`` picks the implementation at call time (see ``autotune``);
:func:`cache_stats` counts kernel-cache look-ups in this process.
"""

from fxsparse.codegen.autotune import kernels_mode
from fxsparse.codegen.cache import cache_stats, clear_cache, reset_cache_stats

__all__ = ["cache_stats", "clear_cache", "reset_cache_stats", "kernels_mode"]
