"""Distiller and hyperparameter search: Auto-KD (MCTS over distillers) and BOSS (BO + self-distillation).

Both keep their trials in Optuna storage (SQLite in the output directory by default, any
database URL to spread trials over machines), so an interrupted search resumes without losing
finished trials. Entry point: `kdforge.search.cli.search_command` (``kdforge search autokd|boss``).
Optuna is imported lazily: it is the optional extra ``pip install 'kdforge[search]'``.

This package imports nothing heavy at import time; `kdforge.losses.autokd` (the
`autokd_distill` loss a searched recipe may name) only needs torch.
"""

from kdforge.losses import autokd as autokd_loss  # noqa: F401  (registers the autokd_distill loss)

__all__ = ["autokd_loss"]
