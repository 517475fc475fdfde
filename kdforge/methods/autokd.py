"""Auto-KD lives in kdforge.search.autokd (a search, not a training module); importing it registers it.

Run it with ``kdforge search autokd CONFIG``; the searched distiller is written as a normal recipe.
"""

from kdforge.search.autokd import run_autokd  # noqa: F401  (registers METHODS["autokd"])
