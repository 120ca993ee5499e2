"""benchmarks/step_profile.py, the op-by-op profile behind bench_train --profile: its FLOP counts
come from real compiled HLO and its times from a real jax.profiler trace."""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import step_profile  # noqa: E402


def matmul_and_attention(x_MxK, w_KxN, q_BxTxD, k_BxSxD):
    scores_BxTxS = jnp.einsum("btd,bsd->bts", q_BxTxD, k_BxSxD)
    return jnp.tanh(x_MxK @ w_KxN), jax.nn.softmax(scores_BxTxS, axis=-1)


def args():
    keys = jax.random.split(jax.random.key(0), 4)
    return (jax.random.normal(keys[0], (64, 96)), jax.random.normal(keys[1], (96, 80)),
            jax.random.normal(keys[2], (3, 16, 8)), jax.random.normal(keys[3], (3, 24, 8)))


def test_hlo_dots_counts_flops_and_tells_batched_dots():
    compiled = jax.jit(matmul_and_attention).lower(*args()).compile()
    dots = step_profile.hlo_dots(compiled.as_text())
    flops = sorted((d["flops"], d["batched"]) for d in dots.values())
    assert (2.0 * 3 * 16 * 24 * 8, True) in flops  # q k^T: [3, 16, 24] outputs, contracting 8
    assert (2.0 * 64 * 80 * 96, False) in flops    # x w: [64, 80] outputs, contracting 96


def test_profile_jax_attributes_time_and_flops_per_kind():
    compiled = jax.jit(matmul_and_attention).lower(*args()).compile()
    inputs = args()
    profile = step_profile.profile_jax(compiled, lambda: jax.block_until_ready(compiled(*inputs)), steps=3)
    assert profile["gflop"]["matmul"] == 2 * 64 * 80 * 96 / 1e9
    assert profile["gflop"]["attention"] == 2 * 3 * 16 * 24 * 8 / 1e9
    assert profile["seconds"]["matmul"] > 0 and profile["seconds"]["attention"] > 0
    assert profile["seconds"]["other"] > 0  # tanh, softmax
    assert sum(profile["seconds"].values()) <= profile["step_wall_s"] * 2  # two threads at most
    assert "| jaxtune:lora |" in "\n".join(step_profile.markdown({"jaxtune:lora": profile}))


def test_profile_torch_attributes_time_and_flops_per_kind():
    import torch

    x, w = torch.randn(64, 96), torch.randn(96, 80)
    q, k = torch.randn(3, 16, 8), torch.randn(3, 24, 8)
    profile = step_profile.profile_torch(lambda: (torch.tanh(x @ w), torch.softmax(q @ k.transpose(1, 2), -1)),
                                         steps=3)
    assert profile["gflop"]["matmul"] == 2 * 64 * 80 * 96 / 1e9
    assert profile["gflop"]["attention"] == 2 * 3 * 16 * 24 * 8 / 1e9
    assert profile["seconds"]["matmul"] > 0 and profile["seconds"]["attention"] > 0
    assert abs(sum(profile["seconds"].values()) - profile["step_wall_s"]) < 1e-3 + 0.01 * profile["step_wall_s"]
