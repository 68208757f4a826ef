"""Framework adapters for gradwatch, thin layers over `gradwatch.GradWatch`.

Each lives in its own module and imports its framework only when imported itself:

    gradwatch.integrations.lightning   Lightning 2.x `Callback` (both package names)
    gradwatch.integrations.keras       Keras 3 `Callback` (torch, jax, tensorflow backends)
    gradwatch.integrations.jax         `check_jax`: a gradient check of a JAX loss over a pytree

The Hugging Face Trainer and plain PyTorch loops need no adapter: `GradWatch` itself answers
the Trainer's events and has `step()` for loops.

Imports: nothing (each adapter imports gradwatch and its own framework).
"""
