"""Serving many adapters over one base: mixed batches vs one adapter at a time, on the real model.

    python benchmarks/bench_serve.py [--model=smollm2-135m-instruct] [--adapters=8 --prompts_per_adapter=8]
        [--prompt_len=32 --new_tokens=64] [--repeats=2] [--chunk_tokens=8] [--no_hf] [--threads=2]
        [--kernels_only | --steps_only] [--no_kernels] [--no_steps]

8 LoRA adapters (random, ranks 4/8/16 in turn, all linear targets) over SmolLM2-135M-Instruct, 8
prompts each (random token ids of prompt_len, EOS off so every row emits exactly new_tokens tokens).

1. The per-row delta kernels of `jaxtune.models.multi_lora` (gathered = BGMV, all columns = one matmul
   over every adapter's packed rank columns with the row's own kept) and the base matmul x W, at the
   gate/up projection shape, for banks of 68 columns (8 adapters of ranks 4/8/16 packed), 128 (8 x 16)
   and 256, 8 or 64 rows, 1 token (decode) or 31 (prefill).
2. One whole decode step (`generate.decode_steps`, chunk_tokens steps per call) at batch 8 and 64:
   the base alone, one adapter through the ordinary LoRA path, the bank with each kernel, and a bank
   sized for 8 adapters of the largest rank (8 x 16 = 128 columns, the server's default sizing and the
   cost of padding every rank to the largest) with all columns.
3. The same 64 requests served end to end as
  * mixed:            one batch of all 64 rows, each row with its own adapter (jaxtune.multi_adapter);
  * the same, decoded chunk_tokens steps per call (`generate.generate_chunks`, the server's path);
  * mixed, batch 8:   8 batches of 8 rows whose adapters are mixed (the per-row delta at batch 8);
  * one at a time:    per adapter, one batch of its 8 prompts through the ordinary LoRA path;
  * merged swap:      per adapter, merge W + scaling a b (lora.merge_adapters), then its batch of 8
                      over the merged weights (the merge is counted: it is the swap's cost);
  * HF + PEFT:        one PeftModel holding the 8 adapters, `set_adapter` + `generate` per adapter
                      (min_new_tokens = max_new_tokens), unless --no_hf.
Generated tokens/s for each, the best of `repeats` after a warm-up (compiles excluded), the jaxtune
variants interleaved round by round in this one process. The load average is printed with the figures.
4. The ceiling of this machine (`matmul_floor`): a mixed batch of all the rows cannot take less than its
   prefill (base weights, no adapter) plus, per new token, the step's dense weight matmuls alone (the
   layers' 7 projections and the output head at the batch's rows, the model's own weights, nothing
   else); one adapter at a time's measured time over that bound is the most any multi-adapter
   implementation could gain here.
"""

from __future__ import annotations

import argparse
import os
import resource
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
    parser.add_argument("--chunk_tokens", type=int, default=8, help="decode steps per call (the server's chunks)")
    parser.add_argument("--step_batches", default="8,64", help="batch sizes of the decode-step table")
    parser.add_argument("--step_variants", default="", help="only the decode-step variants whose names hold one of "
                                                            "these comma-separated parts (e.g. base,all slots)")
    parser.add_argument("--kernels_only", action="store_true", help="only the per-row delta kernels")
    parser.add_argument("--steps_only", action="store_true", help="stop after the decode-step table")
    parser.add_argument("--no_kernels", action="store_true", help="skip the per-row delta kernels")
    parser.add_argument("--no_steps", action="store_true", help="skip the decode-step table")
    return parser.parse_args(argv)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best(fns: dict, repeats: int) -> dict:
    """{name: best seconds of fn()} over `repeats` rounds, the fns run in turn each round (after one warm-up call each)."""
    return {name: wall for name, (wall, _) in interleaved_best_wall_and_cpu(fns, repeats).items()}


def interleaved_best_wall_and_cpu(fns: dict, repeats: int) -> dict:
    """{name: (best wall seconds, best process CPU seconds) of fn()}, interleaved as `interleaved_best`. On
    a shared machine the CPU time (all threads of this process) is the steadier measure of a variant's
    work: wall time also counts the time other jobs hold the cores."""
    for fn in fns.values():
        fn()
    times = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[name] = (min(times[name][0], wall), min(times[name][1], cpu))
    return times


def forced_kernel(kernel):
    """Make `multi_lora.bank_dense` use `kernel` for every shape (a benchmark's A/B switch; programs
    traced while it is set keep it)."""
    from jaxtune.models import multi_lora

    multi_lora.delta_kernel = lambda tokens_per_row: kernel


def bench_kernels(repeats: int) -> None:
    """The per-row delta kernels at SmolLM2's gate/up projection shape (576 -> 1536), for several bank
    sizes (rank columns), batch rows and tokens per row (1: a decode step, 31: a prefill of 32); 8
    adapters of ranks 4/8/16 (in turn) over the columns, rows cycling through them and the base."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune.models import multi_lora

    d_in, d_out, max_rank = 576, 1536, 16
    ranks = [(4, 8, 16)[i % 3] for i in range(8)]
    kernels = {"gathered": multi_lora.gathered_delta, "all columns": multi_lora.all_columns_delta}
    print(f"per-row LoRA delta, {d_in} -> {d_out}, float32, ms (best of {max(repeats, 5)}, interleaved); "
          f"the base matmul x W alone for scale:")
    print(f"{'columns':>7} {'rows x tokens':>14} " + " ".join(f"{name:>11}" for name in [*kernels, "x W"]))
    key_a, key_b, key_x, key_w = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(key_w, (d_in, d_out))
    for columns in (sum(ranks), len(ranks) * max_rank, 256):
        column_slots = np.full(columns, -1, np.int32)
        column_slots[:sum(ranks)] = np.repeat(np.arange(1, len(ranks) + 1), ranks)
        a = jax.random.normal(key_a, (d_in, columns))
        b = jax.random.normal(key_b, (columns, d_out))
        for rows, tokens in ((8, 1), (64, 1), (8, 31), (64, 31)):
            x = jax.random.normal(key_x, (rows, tokens, d_in))
            slot_of_row = np.arange(rows) % (len(ranks) + 1)
            row_columns = np.full((rows, max_rank), columns, np.int32)
            for i, slot in enumerate(slot_of_row):
                own = np.flatnonzero(column_slots == slot) if slot else []
                row_columns[i, :len(own)] = own
            bank = {multi_lora.ROWS: jnp.asarray(slot_of_row, jnp.int32), multi_lora.COLUMNS: jnp.asarray(column_slots),
                    multi_lora.ROW_COLUMNS: jnp.asarray(row_columns)}
            fns = {name: jax.jit(lambda x, a, b, bank, f=f: f(x, a, b, bank, dtype=jnp.float32))
                   for name, f in kernels.items()}
            calls = {name: (lambda fn=fn: fn(x, a, b, bank).block_until_ready()) for name, fn in fns.items()}
            base = jax.jit(lambda x, w: jnp.dot(x.reshape(-1, d_in), w))
            calls["x W"] = lambda: base(x, w).block_until_ready()
            times = interleaved_best(calls, 3 * max(repeats, 5))
            print(f"{columns:>7} {rows:>7} x {tokens:<4} " + " ".join(f"{times[name] * 1e3:>11.3f}" for name in calls),
                  flush=True)


def bench_decode_steps(model, bank, wide_bank, adapters, names, repeats: int, chunk: int = 8, batches=(8, 64),
                       only: str = "") -> None:
    """One decode step (`generate.decode_steps`, `chunk` steps per call, caches carried and donated), at
    batch 8 and 64: the base alone, one adapter through the ordinary LoRA path, the bank with each
    per-row kernel (rows cycling through the adapters), and `wide_bank` (the same adapters in a bank of
    more columns) with all columns."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune import generate as gen
    from jaxtune import params as params_lib
    from jaxtune.models import multi_lora
    from jaxtune.models.llama import init_cache, unstack_cache

    prompt = 32
    cache_len = prompt + chunk  # each call starts again at slot `prompt`: a small cache, the same work
    eos = jnp.asarray([-1], jnp.int32)
    tree, lora_cfg = adapters[-1]
    lora_params = params_lib.merge_trees(model.params, tree)
    default_kernel = multi_lora.delta_kernel
    print(f"\nwhole decode step (ms per step, {chunk} steps per call, best of {repeats}, interleaved; CPU: process CPU time, both threads), "
          f"cache of {cache_len} slots, the first {prompt} filled:")
    for batch in batches:
        rows = [names[i % len(names)] for i in range(batch)]
        variants = {"base, no adapter": (model.params, model.cfg, None),
                    f"one adapter (LoRA r{lora_cfg.rank})": (lora_params, model.cfg.replace(lora=lora_cfg), None),
                    "bank, gathered": (bank.params(model.params, bank.rows(rows)), model.cfg, multi_lora.gathered_delta),
                    f"bank, all {bank.columns} columns": (bank.params(model.params, bank.rows(rows)), model.cfg,
                                                    multi_lora.all_columns_delta),
                    f"bank, all {wide_bank.columns} columns": (wide_bank.params(model.params, wide_bank.rows(rows)),
                                                         model.cfg, multi_lora.all_columns_delta)}
        runners = {}
        for name, (params, cfg, kernel) in variants.items():
            if only and not any(part in name for part in only.split(",")):
                continue
            layer_params = gen.per_layer_params(params, cfg)
            cache = unstack_cache(init_cache(cfg, batch, cache_len))
            for layer in cache:
                layer["segments"] = layer["segments"].at[:, :prompt].set(1)
            state = {"step": jnp.int32(1), "slot": jnp.int32(prompt), "token": jnp.full((batch,), 7, jnp.int32),
                     "position": jnp.full((batch,), prompt, jnp.int32), "cache": cache,
                     "done": jnp.zeros((batch,), bool), "seed": jnp.uint32(0)}

            def steps(layer_params, state, eos_ids_E, max_new_tokens, *, cfg, sampling, chunk):
                return gen.decode_steps(layer_params, state, eos_ids_E, max_new_tokens, cfg=cfg, sampling=sampling,
                                        chunk=chunk)

            # A new function per variant: its own trace, under its own kernel.
            step = jax.jit(steps, static_argnames=("cfg", "sampling", "chunk"), donate_argnames=("state",))
            if kernel is not None:
                forced_kernel(kernel)
            box = {"state": state}

            def run(step=step, layer_params=layer_params, cfg=cfg, box=box):
                state = {**box["state"], "step": jnp.int32(1), "slot": jnp.int32(prompt)}
                box["state"], tokens = step(layer_params, state, eos, jnp.int32(1 << 30), cfg=cfg,
                                            sampling=gen.Sampling(), chunk=chunk)
                np.asarray(tokens)

            run()  # compile under this variant's kernel
            multi_lora.delta_kernel = default_kernel
            runners[name] = run
        times = interleaved_best_wall_and_cpu(runners, repeats)
        for name, (seconds, cpu_seconds) in times.items():
            print(f"  batch {batch:>2}  {name:<28} {seconds / chunk * 1e3:8.1f} ms/step  "
                  f"{batch * chunk / seconds:7.1f} tokens/s  (CPU {cpu_seconds / chunk * 1e3:7.1f} ms/step)", flush=True)
        print(f"  (peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)", flush=True)
        del runners


def matmul_floor(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> tuple[float, float, float]:
    """(seconds of one decode step's dense weight matmuls alone at `batch` rows, their GFLOP, seconds of
    the base prefill of `batch` prompts of prompt_len tokens into a cache of prompt_len + new_tokens
    slots), the best of `repeats` after a warm-up.

    The matmuls: every layer's q/k/v/o/gate/up/down kernel and the output head (`llama.lm_head`'s
    kernel) applied to random activations of `batch` rows, each product summed to a scalar so none is
    dropped (the layers' dots in one compiled program, the head's in another); the same shapes and
    weights as `generate.decode_step`'s dots, without its attention, norms, rotary, cache writes or
    token selection."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxtune import generate as gen
    from jaxtune.models.llama import lm_head

    layers = gen.per_layer_params(model.params, model.cfg)["model"]
    kernels = [leaf for layer in range(model.cfg.num_layers)
               for leaf in jax.tree_util.tree_leaves(layers[f"layers_{layer}"]) if leaf.ndim == 2]
    head_kernel, _, _, head_spec = lm_head(model.params, model.cfg)
    widths = sorted({k.shape[0] for k in kernels})
    rng = np.random.default_rng(0)
    inputs = {w: jnp.asarray(rng.standard_normal((batch, w), np.float32)) for w in widths}

    @jax.jit
    def layer_dots(kernels, inputs):
        return sum(jnp.sum(inputs[k.shape[0]] @ k) for k in kernels)

    @jax.jit
    def head_dot(kernel, x_BxD):  # kernel [V, D] (tied) or [D, V]
        return jnp.sum(x_BxD @ kernel.T if head_spec.kernel_is_VxD else x_BxD @ kernel)

    flops = 2 * batch * (sum(k.size for k in kernels) + model.cfg.vocab_size * model.cfg.hidden_size)
    tokens_BxP = jnp.asarray(rng.integers(3, model.cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    segments_BxP = jnp.ones_like(tokens_BxP)
    prefill = jax.jit(gen.prefill, static_argnames=("cfg", "cache_len"))
    # Two programs: with the head's dot in the layers' program, XLA:CPU ran the whole ~25% slower than
    # the two apart (SmolLM2-135M, 64 rows: 135 vs 82 + 24 ms), and this is meant as a floor.
    dots = {"layers": lambda: jax.block_until_ready(layer_dots(kernels, inputs)),
            "head": lambda: jax.block_until_ready(head_dot(head_kernel, inputs[model.cfg.hidden_size]))}
    # The dots are timed apart from the prefill: the first program run after the 2.6 s prefill ran 30%
    # slower (layers' dots 111 vs 85 ms), whatever it was.
    best = interleaved_best(dots, max(repeats, 5))
    best.update(interleaved_best({"prefill": lambda: jax.block_until_ready(prefill(
        model.params, model.cfg, tokens_BxP, segments_BxP, cache_len=prompt_len + new_tokens))}, repeats))
    return best["layers"] + best["head"], flops / 1e9, best["prefill"]


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
    if not args.no_kernels:
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
    # Packed: just the columns the adapters' ranks take (AdapterBank.from_dirs' default sizing).
    bank = AdapterBank(model.cfg, capacity=args.adapters + 1, max_rank=max(ranks),
                       columns=sum(cfg.rank for _, cfg in adapters))
    for name, (tree, lora_cfg) in zip(names, adapters):
        bank.add(name, tree, lora_cfg)
    rng = np.random.default_rng(0)
    per_adapter = {name: rng.integers(3, model.cfg.vocab_size, size=(args.prompts_per_adapter, args.prompt_len)).tolist()
                   for name in names}
    if not args.no_steps:
        wide_bank = AdapterBank(model.cfg, capacity=args.adapters + 1, max_rank=max(ranks))  # every slot at the max rank
        for name, (tree, lora_cfg) in zip(names, adapters):
            wide_bank.add(name, tree, lora_cfg)
        bench_decode_steps(model, bank, wide_bank, adapters, names, args.repeats, args.chunk_tokens,
                           [int(b) for b in args.step_batches.split(",")], args.step_variants)
    if args.steps_only:
        print(load_report(load_start, load_averages()))
        return
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

    def mixed_in_chunks():  # the server's path: one batch of all rows, decoded `chunk_tokens` steps per call
        params = bank.params(model.params, bank.rows([n for n, _ in mixed_rows]))
        chunks = list(gen.generate_chunks(model, [p for _, p in mixed_rows], args.new_tokens, args.chunk_tokens,
                                          eos_ids=[], params=params))
        assert sum(c.shape[1] for c in chunks) == args.new_tokens

    adapter_params = [params_lib.merge_trees(model.params, tree) for tree, _ in adapters]

    def one_at_a_time():
        for name, params, (_, lora_cfg) in zip(names, adapter_params, adapters):
            gen.generate(model, per_adapter[name], args.new_tokens, eos_ids=[], params=params, lora=lora_cfg)

    def merged_swap():
        for name, params, (_, lora_cfg) in zip(names, adapter_params, adapters):
            merged, _ = lora.merge_adapters(params, model.cfg.replace(lora=lora_cfg))
            gen.generate(model, per_adapter[name], args.new_tokens, eos_ids=[], params=merged)

    variants = {f"mixed, one batch of {len(mixed_rows)}": mixed(len(mixed_rows)),
                f"  same, in chunks of {args.chunk_tokens} steps": mixed_in_chunks,
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
    cpu_times = {name: float("inf") for name in variants}  # process CPU time: steadier on a shared machine
    for round_number in range(args.repeats):  # interleaved rounds
        for name, run in variants.items():
            cpu = time.process_time()
            times[name] = min(times[name], best_of(run, 1))
            cpu_times[name] = min(cpu_times[name], time.process_time() - cpu)
            print(f"  round {round_number + 1}: {name:<38} {times[name]:7.2f} s (CPU {cpu_times[name]:7.2f} s)",
                  flush=True)
    if not args.no_hf:
        times["HF + PEFT, set_adapter per adapter"] = hf_peft_loop(args, model, names, adapters, per_adapter)

    print("\nbest times (and the ratio of process CPU times, the steadier one when the machine is shared):")
    reference, cpu_reference = times["one adapter at a time"], cpu_times["one adapter at a time"]
    for name, seconds in times.items():
        cpu_ratio = f"  CPU {cpu_reference / cpu_times[name]:5.2f}x" if name in cpu_times else ""
        print(f"  {name:<38} {seconds:7.2f} s  {total_tokens / seconds:8.1f} tokens/s  "
              f"{reference / seconds:5.2f}x one-at-a-time{cpu_ratio}")
    dots_s, dots_gflop, prefill_s = matmul_floor(model, len(mixed_rows), args.prompt_len, args.new_tokens, args.repeats)
    floor_s = prefill_s + args.new_tokens * dots_s
    print(f"\nceiling on this machine: a mixed batch of {len(mixed_rows)} takes at least its prefill "
          f"({prefill_s:.2f} s, base weights) + {args.new_tokens} steps x the weight matmuls alone "
          f"({dots_s * 1e3:.1f} ms each, {dots_gflop:.1f} GFLOP at {dots_gflop / dots_s:.0f} GFLOP/s) = {floor_s:.2f} s; "
          f"one adapter at a time took {reference:.2f} s: no mixed batch can be more than "
          f"{reference / floor_s:.2f}x faster here")
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
