"""Inference speed and memory, jaxtune vs Hugging Face transformers (torch), side by side on CPU.

    python benchmarks/bench_inference.py [--model=smollm2-135m-instruct] [--dtype=float32] \
        [--threads=2] [--repeats=3] [--prefill_batch=8 --prefill_len=256] \
        [--prompt_len=64 --new_tokens=128 --decode_batches=1,8]

Measures, on the same model and the same random token ids:
  * prefill: one forward pass over a [prefill_batch, prefill_len] batch (logits for every position,
    as both libraries compute by default) -> tokens/s;
  * greedy decode: `jaxtune.generate.generate` vs HF `model.generate(do_sample=False,
    min_new_tokens=max_new_tokens)`, prompts of prompt_len tokens, new_tokens new tokens, EOS off,
    so both emit exactly batch * new_tokens tokens -> new tokens/s (prefill of the prompt included).
Each side runs in its own fresh process (so each one's peak RSS is its own), one after the other,
with the same thread count (torch.set_num_threads and XLA's CPU thread pool, pinned with
sched_setaffinity to the first `threads` cores). Times are the best of `repeats` runs after a warm-up
run, and the best over `rounds` alternating rounds (jaxtune, HF, jaxtune, HF, ...), which keeps a
burst of load from other processes from deciding the ratio; the first round's warm-up minus its best
run is reported as compile/warm-up time. The load average is printed with the table: on a shared
machine, torch's OpenMP threads slow down far more under contention than XLA's thread pool does.
Prints one table with the jaxtune / HF ratios; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from collections.abc import Callable

from machine_load import load_averages, load_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder or hub id")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prefill_batch", type=int, default=8)
    parser.add_argument("--prefill_len", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--decode_batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--only", choices=("jaxtune", "hf"), default=None, help="run one side only")
    args = parser.parse_args(argv)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    return args


def random_tokens(batch: int, length: int, vocab: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int32)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call seconds, best of `repeats` later calls seconds)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_threads(threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)


def run_jaxtune(args: argparse.Namespace) -> dict:
    pin_threads(args.threads)
    import jax
    import jax.numpy as jnp

    from jaxtune import api, generate
    from jaxtune.models.llama import Llama

    model = api.load(args.model, param_dtype=args.dtype, compute_dtype=args.dtype, with_tokenizer=False)
    vocab = model.cfg.vocab_size
    results = {"load_rss_mib": peak_rss_mib()}

    forward = jax.jit(lambda p, t, pos, seg: Llama(model.cfg).apply({"params": p}, t, pos, seg)[0])
    tokens = jnp.asarray(random_tokens(args.prefill_batch, args.prefill_len, vocab, 0))
    positions = jnp.broadcast_to(jnp.arange(args.prefill_len, dtype=jnp.int32), tokens.shape)
    segments = jnp.ones_like(tokens)
    first, best = timed(lambda: forward(model.params, tokens, positions, segments).block_until_ready(), args.repeats)
    results["prefill"] = (tokens.size / best, first - best)

    for batch in args.decode_batches:
        prompts = random_tokens(batch, args.prompt_len, vocab, 1).tolist()
        out = []
        first, best = timed(lambda: out.append(generate.generate(model, prompts, args.new_tokens, eos_ids=[])),
                            args.repeats)
        assert all(len(row) == args.new_tokens for row in out[-1])
        results[f"decode_b{batch}"] = (batch * args.new_tokens / best, first - best)
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def run_hf(args: argparse.Namespace) -> dict:
    pin_threads(args.threads)
    import torch
    import transformers

    from jaxtune import hf

    torch.set_num_threads(args.threads)
    folder = hf.resolve_model_dir(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    vocab = model.config.vocab_size
    results = {"load_rss_mib": peak_rss_mib()}

    tokens = torch.from_numpy(random_tokens(args.prefill_batch, args.prefill_len, vocab, 0)).long()
    with torch.inference_mode():
        first, best = timed(lambda: model(input_ids=tokens).logits, args.repeats)
    results["prefill"] = (tokens.numel() / best, first - best)

    for batch in args.decode_batches:
        prompts = torch.from_numpy(random_tokens(batch, args.prompt_len, vocab, 1)).long()
        config = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            pad_token_id=model.config.pad_token_id or 0, eos_token_id=model.config.eos_token_id)
        out = []
        with torch.inference_mode():
            first, best = timed(lambda: out.append(model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config)), args.repeats)
        assert out[-1].shape == (batch, args.prompt_len + args.new_tokens)
        results[f"decode_b{batch}"] = (batch * args.new_tokens / best, first - best)
    results["peak_rss_mib"] = peak_rss_mib()
    return results


def _child(target, args, queue):
    queue.put(target(args))


def in_fresh_process(target, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def table(args: argparse.Namespace, jt: dict | None, hf: dict | None) -> str:
    rows = [("prefill", f"forward {args.prefill_batch}x{args.prefill_len}, tokens/s")]
    rows += [(f"decode_b{b}", f"greedy decode batch {b} ({args.prompt_len}+{args.new_tokens}), new tokens/s")
             for b in args.decode_batches]
    header = f"{'measure':<46} {'jaxtune':>10} {'HF torch':>10} {'ratio':>7}   {'compile/warm-up s (jt, HF)':>26}"
    lines = [header, "-" * len(header)]
    for key, title in rows:
        ours, theirs = (jt or {}).get(key, (float("nan"),) * 2), (hf or {}).get(key, (float("nan"),) * 2)
        lines.append(f"{title:<46} {ours[0]:>10.1f} {theirs[0]:>10.1f} {ours[0] / theirs[0]:>6.2f}x"
                     f"   {max(ours[1], 0.0):>12.1f} {max(theirs[1], 0.0):>12.1f}")
    for key, title in (("load_rss_mib", "peak RSS after loading the model, MiB"),
                       ("peak_rss_mib", "peak RSS over the whole run, MiB")):
        ours, theirs = (jt or {}).get(key, float("nan")), (hf or {}).get(key, float("nan"))
        lines.append(f"{title:<46} {ours:>10.0f} {theirs:>10.0f} {ours / theirs:>6.2f}x")
    return "\n".join(lines)


def best_of(rounds: list[dict]) -> dict | None:
    """Highest throughput over rounds (with the first round's compile time), highest RSS."""
    if not rounds:
        return None
    merged = dict(rounds[0])
    for result in rounds[1:]:
        for key, value in result.items():
            if isinstance(value, tuple):
                merged[key] = (max(merged[key][0], value[0]), merged[key][1])
            else:
                merged[key] = max(merged[key], value)
    return merged


def main(argv=None) -> None:
    args = parse_args(argv)
    load_start = load_averages()
    jt_rounds, hf_rounds = [], []
    for _ in range(args.rounds):
        if args.only in (None, "jaxtune"):
            jt_rounds.append(in_fresh_process(run_jaxtune, args))
        if args.only in (None, "hf"):
            hf_rounds.append(in_fresh_process(run_hf, args))
    print(f"model {args.model} ({args.dtype}), {args.threads} threads, best of {args.repeats} runs x "
          f"{args.rounds} rounds after warm-up")
    print(table(args, best_of(jt_rounds), best_of(hf_rounds)))
    print(load_report(load_start, load_averages()))


if __name__ == "__main__":
    main()
