"""routilux 1.1.0's ``routilux.exceptions`` path: every routilux-mp exception.

``from routilux_mp.exceptions import ExecutionError, RoutiluxError`` works as it
did with routilux; the classes are those of :mod:`routilux_mp.errors`.
"""

from . import errors as _errors
from .errors import *

__all__ = list(_errors.__all__)
