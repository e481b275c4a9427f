"""Moved: kvforge.kernels.quantize and kvforge.cache.codecs."""

from kvforge.cache.codecs import *  # noqa: F401,F403
from kvforge.kernels.quantize import *  # noqa: F401,F403
