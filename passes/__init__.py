"""fxsparse.passes: one pass per module, each a function declared with ``@fxpass`` (see ``manager``).

``python -m fxsparse.passes --list`` prints every pass with what it reads and writes.
"""
