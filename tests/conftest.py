"""Shared test setup: one CPU thread (multi-threaded small ops are far slower on 2-core CI)."""

import torch

torch.set_num_threads(1)
