import jax
import pytest


@pytest.fixture
def x64():
    """Run the test in float64: the theory checks compare against tight references."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
