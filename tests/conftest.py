"""Strict numerics for every test (STYLE.md section 5, rule 7)."""

import json
import os
import subprocess
import sys
from collections.abc import Callable

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


def _run_on_4_devices(script: str, timeout: int = 60) -> dict:
    """Runs `script` in a fresh interpreter with 4 fake CPU devices; its "RESULT {json}" line."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture
def on_4_devices() -> Callable[..., dict]:
    """`run(script, timeout=60)`: the script's RESULT json, run on 4 fake CPU devices (XLA_FLAGS
    must be set before jax starts, hence a subprocess)."""
    return _run_on_4_devices
