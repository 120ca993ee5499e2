"""Serving many adapters over one base: mixed batches vs one adapter at a time, on the real model.

    python benchmarks/bench_serve.py [--model=smollm2-135m-instruct] [--adapters=8 --prompts_per_adapter=8]
        [--prompt_len=32 --new_tokens=64] [--repeats=2] [--no_hf] [--kernels_only] [--threads=2]

8 LoRA adapters (random, ranks 4/8/16 in turn, all linear targets) over SmolLM2-135M-Instruct, 8
prompts each (random token ids of prompt_len, EOS off so every row emits exactly new_tokens tokens).
The same 64 requests are served as
  * mixed:            one batch of all 64 rows, each row with its own adapter (jaxtune.multi_adapter);
  * mixed, batch 8:   8 batches of 8 rows whose adapters are mixed (the per-row delta at batch 8);
  * one at a time:    per adapter, one batch of its 8 prompts through the ordinary LoRA path;
  * merged swap:      per adapter, merge W + scaling a b (lora.merge_adapters), then its batch of 8
                      over the merged weights (the merge is counted: it is the swap's cost);
  * HF + PEFT:        one PeftModel holding the 8 adapters, `set_adapter` + `generate` per adapter
                      (min_new_tokens = max_new_tokens), unless --no_hf.
Generated tokens/s for each, the best of `repeats` after a warm-up (compiles excluded), the jaxtune
variants interleaved round by round in this one process. First, the per-row delta kernels
(`multi_lora.gathered_delta`, BGMV, vs `grouped_delta`, ragged_dot SGMV) at the model's projection
shapes, interleaved, best of repeats. The load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from machine_load import load_averages, load_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts_per_adapter", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--ranks", default="4,8,16", help="adapter ranks, used in turn")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_hf", action="store_true", help="skip the HF + PEFT loop")
    parser.add_argument("--kernels_only", action="store_true")
    return parser.parse_args(argv)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_kernels(repeats: int) -> None:
    """BGMV vs SGMV per-row deltas at SmolLM2 projection shapes (576 -> 1536), 9 slots of rank 16."""
    import jax
    import jax.numpy as jnp

    from jaxtune.models import multi_lora

    slots, rank, d_in, d_out = 9, 16, 576, 1536
    key_a, key_b, key_x, key_r = jax.random.split(jax.random.key(0), 4)
    a = jax.random.normal(key_a, (slots, d_in, rank))
    b = jax.random.normal(key_b, (slots, rank, d_out))
    print(f"per-row LoRA delta, {slots} slots (8 adapters + base) of rank {rank}, {d_in} -> {d_out}, float32:")
    print(f"{'rows x tokens':>14} {'gathered (BGMV)':>16} {'grouped (SGMV)':>15}  ratio")
    for rows, tokens in ((8, 1), (64, 1), (8, 64)):
        x = jax.random.normal(key_x, (rows, tokens, d_in))
        slot_of_row = jax.random.randint(key_r, (rows,), 0, slots)
        fns = {name: jax.jit(lambda x, a, b, r, f=f: f(x, a, b, r, dtype=jnp.float32))
               for name, f in (("gathered", multi_lora.gathered_delta), ("grouped", multi_lora.grouped_delta))}
        for fn in fns.values():
            fn(x, a, b, slot_of_row).block_until_ready()
        times = {name: float("inf") for name in fns}
        for _ in range(max(repeats, 5)):  # interleaved
            for name, fn in fns.items():
                times[name] = min(times[name], best_of(lambda: fn(x, a, b, slot_of_row).block_until_ready(), 3))
        print(f"{rows:>7} x {tokens:<4} {times['gathered'] * 1e3:>13.3f} ms {times['grouped'] * 1e3:>12.3f} ms"
              f"  {times['grouped'] / times['gathered']:.1f}x")


def random_adapter_trees(cfg, ranks):
    """One random adapter tree (lora_a, lora_b, all linear targets) per rank -> [(tree, LoRAConfig)]."""
    import jax

    from jaxtune import lora

    out = []
    for i, rank in enumerate(ranks):
        lora_cfg = lora.lora_config(rank, 2 * rank, 0.0, "all-linear", False)
        leaves, treedef = jax.tree_util.tree_flatten(lora.adapter_shapes(cfg.replace(lora=lora_cfg)))
        keys = jax.random.split(jax.random.key(i), len(leaves))
        tree = jax.tree_util.tree_unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                                      for k, x in zip(keys, leaves)])
        out.append((tree, lora_cfg))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    load_start = load_averages()
    bench_kernels(args.repeats)
    if args.kernels_only:
        print(load_report(load_start, load_averages()))
        return

    import numpy as np

    from jaxtune import api, lora
    from jaxtune import generate as gen
    from jaxtune import params as params_lib
    from jaxtune.multi_adapter import AdapterBank

    model = api.load(args.model, with_tokenizer=False)
    ranks = [int(r) for r in args.ranks.split(",")]
    adapters = random_adapter_trees(model.cfg, [ranks[i % len(ranks)] for i in range(args.adapters)])
    names = [f"adapter{i}" for i in range(args.adapters)]
    bank = AdapterBank(model.cfg, capacity=args.adapters + 1, max_rank=max(ranks))
    for name, (tree, lora_cfg) in zip(names, adapters):
        bank.add(name, tree, lora_cfg)
    rng = np.random.default_rng(0)
    per_adapter = {name: rng.integers(3, model.cfg.vocab_size, size=(args.prompts_per_adapter, args.prompt_len)).tolist()
                   for name in names}
    # Rows interleaved across adapters, as requests would arrive.
    mixed_rows = [(name, per_adapter[name][j]) for j in range(args.prompts_per_adapter) for name in names]
    total_tokens = len(mixed_rows) * args.new_tokens

    def mixed(batch):
        def run():
            for start in range(0, len(mixed_rows), batch):
                chunk = mixed_rows[start:start + batch]
                out = gen.generate_with_adapters(model, bank, [p for _, p in chunk], [n for n, _ in chunk],
                                                 args.new_tokens, eos_ids=[])
                assert all(len(row) == args.new_tokens for row in out)
        return run

    adapter_params = [params_lib.merge_trees(model.params, tree) for tree, _ in adapters]

    def one_at_a_time():
        for name, params, (_, lora_cfg) in zip(names, adapter_params, adapters):
            gen.generate(model, per_adapter[name], args.new_tokens, eos_ids=[], params=params, lora=lora_cfg)

    def merged_swap():
        for name, params, (_, lora_cfg) in zip(names, adapter_params, adapters):
            merged, _ = lora.merge_adapters(params, model.cfg.replace(lora=lora_cfg))
            gen.generate(model, per_adapter[name], args.new_tokens, eos_ids=[], params=merged)

    variants = {f"mixed, one batch of {len(mixed_rows)}": mixed(len(mixed_rows)),
                f"mixed, batches of {args.prompts_per_adapter}": mixed(args.prompts_per_adapter),
                "one adapter at a time": one_at_a_time,
                "merged weights, swapped per adapter": merged_swap}
    print(f"\n{args.adapters} adapters (ranks {args.ranks}, all linear targets) x {args.prompts_per_adapter} prompts "
          f"of {args.prompt_len} tokens, {args.new_tokens} new tokens each ({total_tokens} tokens), float32, "
          f"{args.threads} threads:", flush=True)
    for name, run in variants.items():  # warm-up: compiles
        started = time.perf_counter()
        run()
        print(f"  warm-up (compile + run) {name}: {time.perf_counter() - started:.1f} s", flush=True)
    times = {name: float("inf") for name in variants}
    for round_number in range(args.repeats):  # interleaved rounds
        for name, run in variants.items():
            times[name] = min(times[name], best_of(run, 1))
            print(f"  round {round_number + 1}: {name:<38} {times[name]:7.2f} s", flush=True)
    if not args.no_hf:
        times["HF + PEFT, set_adapter per adapter"] = hf_peft_loop(args, model, names, adapters, per_adapter)

    print("\nbest times:")
    reference = times["one adapter at a time"]
    for name, seconds in times.items():
        print(f"  {name:<38} {seconds:7.2f} s  {total_tokens / seconds:8.1f} tokens/s  "
              f"{reference / seconds:5.2f}x one-at-a-time")
    print(load_report(load_start, load_averages()))


def hf_peft_loop(args, model, names, adapters, per_adapter) -> float:
    """Seconds for HF + PEFT to serve each adapter's prompts in turn (best of repeats, after a warm-up)."""
    import peft
    import torch
    import transformers

    from jaxtune import peft as peft_io

    torch.set_num_threads(args.threads)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model.folder), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = None
        for name, (tree, lora_cfg) in zip(names, adapters):
            folder = peft_io.save_peft_adapter(tree, model.cfg.replace(lora=lora_cfg), f"{tmp}/{name}",
                                               str(model.folder))
            if peft_model is None:
                peft_model = peft.PeftModel.from_pretrained(base, str(folder), adapter_name=name).eval()
            else:
                peft_model.load_adapter(str(folder), adapter_name=name)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens,
                                           min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

    def run():
        with torch.inference_mode():
            for name in names:
                peft_model.set_adapter(name)
                prompts = torch.tensor(per_adapter[name], dtype=torch.long)
                out = peft_model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                          generation_config=config)
                assert out.shape[1] == args.prompt_len + args.new_tokens

    run()
    return best_of(run, args.repeats)


if __name__ == "__main__":
    main()
