"""The fxsparse application: the ``fxsparse`` command, training loops, data, corpus and the default model.

The library (``fxsparse``: capture, passes, layers, recipes, adapters, compile, codegen) needs only torch,
transformers and safetensors; this package also needs the ``app`` extras (``pip install fxsparse[app]``:
tqdm, gguf, matplotlib, numpy), which ``make setup`` installs.
"""
