"""Every ``fxsparse::`` custom op, registered by importing its kernel family (one import line per family)."""

from fxsparse.codegen.s2ft import s2ft_linear, s2ft_multi_adapter  # noqa: F401
from fxsparse.codegen.sltrain import sltrain_block, sltrain_random  # noqa: F401
