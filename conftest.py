"""Root pytest configuration: which adapter modules under integrations/ are collected for
their doctests (tests/ has the end-to-end tests of every adapter)."""

from __future__ import annotations

import importlib.util

# Keras fixes its backend when first imported (KERAS_BACKEND); tests/test_integration_keras.py
# runs each backend in its own process instead.
collect_ignore = ["integrations/keras.py", "tests/keras_train.py"]
for _module, _package in (("integrations/lightning.py", "lightning"),
                          ("integrations/jax.py", "jax")):
    if importlib.util.find_spec(_package) is None:
        collect_ignore.append(_module)
