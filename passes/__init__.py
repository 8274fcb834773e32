"""fxsparse.passes: one pass per module; each is a function returning a ``PassResult`` (see ``manager``)."""
