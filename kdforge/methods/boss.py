"""BOSS lives in kdforge.search.boss (a search, not a training module); importing it registers it.

Run it with ``kdforge search boss CONFIG``; each trial is a normal kdforge run.
"""

from kdforge.search.boss import run_boss  # noqa: F401  (registers METHODS["boss"])
