"""jaxtune.plan.measured.trim_after_compiles: malloc_trim after long XLA compiles, not after short ones."""

import jax
import jax.numpy as jnp
import pytest

from jaxtune.plan import measured


@pytest.fixture
def trims(monkeypatch):
    calls = []
    if not measured.trim_after_compiles():
        pytest.skip("no glibc malloc_trim here")
    monkeypatch.setitem(measured._trim, "malloc_trim", lambda pad: calls.append(pad))
    yield calls


def compile_a_fresh_program(n: int):
    jax.jit(lambda x: jnp.sin(x) * n).lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile()


def test_a_compile_of_at_least_min_seconds_is_followed_by_a_trim(trims, monkeypatch):
    monkeypatch.setitem(measured._trim, "min_seconds", 0.0)
    compile_a_fresh_program(3)  # jax reports the compile under the event the listener waits for
    assert trims == [0]


def test_a_shorter_compile_is_not(trims, monkeypatch):
    monkeypatch.setitem(measured._trim, "min_seconds", 1e9)
    compile_a_fresh_program(5)
    assert trims == []


def test_registering_twice_adds_one_listener(trims, monkeypatch):
    monkeypatch.setitem(measured._trim, "min_seconds", 0.0)
    measured.trim_after_compiles(min_seconds=0.0)
    compile_a_fresh_program(7)
    assert trims == [0]
