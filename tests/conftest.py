"""Strict numerics for every test (STYLE.md section 5, rule 7)."""

import os

os.environ.setdefault("PYTHONHASHSEED", "0")
# Studies started in subprocesses (sharding, launch tests) call common.init_devices, which turns on
# the persistent compilation cache in ~/.cache; tests keep to their tmp dirs.
os.environ["JAXPRUNE_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture
def fast_compile():
    """Cheaper XLA compiles for end-to-end smoke tests (flax imagenet train_test). Scoped to the test,
    so tolerance-sensitive tests in the same xdist worker keep full optimisation."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
