"""The two small Llama shapes (config.json contents, no weights) that the estimate's compiler-habit
constants are fitted on and checked against: benchmarks/fit_plan.py compiles them (with shipped
architectures) to fit jaxtune/plan/compiler_habits.json, and tests/test_plan.py compares the estimate
with the compiler on the same shapes. One definition, so the fit and its check see the same models.
"""

from __future__ import annotations

# Small, but with TPU-friendly widths (the TPU tiles arrays in 8 x 128 blocks; a model with 2 heads of 16
# would be mostly tile padding, which the estimate does not model) and a vocab small enough that the
# logits do not dominate. Four layers keep the compile to seconds.
TINY_TPU_ARCH = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
                 "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 8192, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
# For XLA:CPU (float32): narrower, so that its compiles stay short too.
TINY_CPU_ARCH = {**TINY_TPU_ARCH, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 2048}

ARCHS = {"tiny-tpu": TINY_TPU_ARCH, "tiny-cpu": TINY_CPU_ARCH}  # fit_plan's case names
