"""Re-export of ``kdfast._shapes``: the one benchmark grid, shared with `kdfast bench`."""
from kdfast._shapes import *  # noqa: F403
from kdfast._shapes import __all__  # noqa: F401
