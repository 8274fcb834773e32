"""fxsparse.codegen: Triton kernels specialised per layer shape, autotuned once and cached on disk.

Not built yet: on every device the S²FT and SLTrain layers run their plain-torch paths
(``fxsparse.layers``). The kernels, the kernel cache and ``cache_stats()`` arrive with the codegen work.
"""
