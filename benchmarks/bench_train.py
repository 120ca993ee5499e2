"""Train-step speed and memory, jaxtune vs Hugging Face transformers + PEFT (torch), side by side on CPU.

    python benchmarks/bench_train.py [--model=smollm2-135m-instruct] [--batch=4 --seq=256] \
        [--steps=5 --warmup=1 --repeats=3] [--modes=lora,full,qlora] [--frameworks=jaxtune,hf] \
        [--threads=2] [--breakdown] [--profile] [--json=FILE]

Same model (the real weights of --model, float32), same synthetic batch ([batch, seq] random token
ids, every token real, loss on every position), same optimizer (AdamW b1/b2/eps/lr/weight decay
and global-norm clipping from jaxtune.config.base_config().optim) on both sides, for
  * lora: r 8, alpha 16, dropout 0, on q,k,v,o,gate,up,down (all linear layers; base frozen);
  * full: every parameter trained;
  * qlora: the lora adapters over an NF4 base (blocks of 64, single
    quantisation; model.quantize=nf4). HF's peer is PEFT over bitsandbytes' NF4 Linear4bit
    (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", compute float32)`), which
    bitsandbytes 0.50 runs on CPU (checked: forward, backward and the LoRA gradients);
  * dora: lora with DoRA (jaxtune lora.dora; peft LoraConfig(use_dora=True));
  * lora+: lora with LoRA+ (jaxtune lora.plus_ratio; peft.optimizers.create_loraplus_optimizer), ratio --plus_ratio.
jaxtune: hf.load_params (+ lora.init_adapters), state.build (trainable/frozen split, optim.optimizer,
the state sharded over the process's devices), jax.jit(step.train_step, donate_argnums=0) after
plan.measured.trim_after_compiles (as jaxtune.train); compile and warm-up steps are timed
apart; the compiled step's memory_analysis (argument/output/temp bytes) is reported.
HF: LlamaForCausalLM.from_pretrained(dtype=float32) (+ peft.get_peft_model(LoraConfig(...))),
torch.optim.AdamW over the trainable params, loss = model(input_ids, labels=input_ids).loss,
backward, clip_grad_norm_, step, zero_grad; torch.set_num_threads(threads).

Every (framework, mode, repeat) runs in its own fresh subprocess (so its peak RSS,
getrusage(RUSAGE_SELF).ru_maxrss, is its own), with JAX_PLATFORMS=cpu unless the environment sets
it (a CPU benchmark: otherwise jax also starts any accelerator plugin installed, e.g. the plan
extra's libtpu, ~100 MiB resident), pinned to `threads` cores; runs are interleaved
across repeats so machine-load drift hits both sides alike. Per run, the median of `steps` timed
steps gives tokens/s; the table shows the median over repeats, the min-max range, and the
1-minute load average around the runs (os.getloadavg), since shared CPUs make timings noisy.
--breakdown adds, for jaxtune, timings of jitted pieces (forward to logits, forward + loss,
value_and_grad, full step) to show where a step's time goes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import step_profile
from machine_load import load_averages, load_report

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("lora", "full", "qlora", "dora", "lora+")  # qlora / dora / lora+: the LoRA variants (model.quantize, lora.dora, lora.plus_ratio)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder or hub id")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compile (HF: after load)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (framework, mode)")
    parser.add_argument("--modes", default="lora,full,qlora")
    parser.add_argument("--frameworks", default="jaxtune,hf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--plus_ratio", type=float, default=16.0, help="lora+ mode: lr of B = ratio x lr of A")
    parser.add_argument("--breakdown", action="store_true", help="jaxtune: also time forward/loss/grad pieces")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 2 more steps per run, op by op: matmuls, attention, the rest (step_profile.py)")
    parser.add_argument("--json", default="", help="also write all raw results to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # "framework:mode", internal
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.frameworks = [f for f in args.frameworks.split(",") if f]
    for m in args.modes:
        if m not in MODES:
            parser.error(f"--modes: unknown mode {m!r} ({', '.join(MODES)})")
    for f in args.frameworks:
        if f not in ("jaxtune", "hf"):
            parser.error(f"--frameworks: unknown framework {f!r} (jaxtune, hf)")
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pin_threads(threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)


def synthetic_tokens(batch: int, seq: int, vocab: int, seed: int = 0):
    """[batch, seq + 1] random ids: inputs are [:, :-1], next-token targets [:, 1:]."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)


def timed_steps(run_step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return times


# ============================================================================================
# jaxtune


def run_jaxtune(args, mode: str) -> dict:
    pin_threads(args.threads)
    import jax
    import jax.numpy as jnp

    from jaxtune import hf, lora, sharding, step
    from jaxtune import params as params_lib
    from jaxtune import state as state_lib
    from jaxtune.config import base_config
    from jaxtune.plan import measured

    from jaxtune.models.quant import QuantConfig

    full = mode == "full"
    folder = hf.resolve_model_dir(args.model)
    adapter = None if full else lora.lora_config(args.rank, args.alpha, 0.0, LORA_TARGETS, False, dora=mode == "dora")
    quantized = QuantConfig(targets=tuple(LORA_TARGETS)) if mode == "qlora" else None
    cfg = hf.model_config_from_hf(folder, param_dtype="float32", compute_dtype="float32", lora=adapter,
                                  quant=quantized)
    t0 = time.perf_counter()
    params = hf.load_params(folder, cfg)
    if not full:
        params = params_lib.merge_trees(params, lora.init_adapters(cfg, jax.random.key(1), params))
    config = base_config()  # its optim section; the state as jaxtune.train builds it, on this process's devices
    config.lora.enabled, config.lora.rank, config.train.seed = not full, args.rank, 0
    config.lora.dora, config.lora.plus_ratio = mode == "dora", args.plus_ratio if mode == "lora+" else 0.0
    mesh = sharding.make_mesh("1,-1,1")
    built = state_lib.build(config, params, mesh, sharding.make_rules(""), args.warmup + args.steps)
    del params
    state, frozen, tx = built.state, built.frozen, built.tx
    del built
    ids = synthetic_tokens(args.batch, args.seq, cfg.vocab_size)
    batch = {
        "tokens": jnp.asarray(ids[:, :-1]),
        "targets": jnp.asarray(ids[:, 1:]),
        "loss_mask": jnp.ones((args.batch, args.seq), jnp.float32),
        "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq)),
        "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32),
    }
    jax.block_until_ready((state, frozen, batch))
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "load_rss_mib": current_rss_mib(),
           "trainable_params": params_lib.count_params(state["params"]),
           "total_params": params_lib.count_params(state["params"]) + params_lib.count_params(frozen)}

    measured.trim_after_compiles()
    train_step = jax.jit(functools.partial(step.train_step, cfg=cfg, tx=tx, grad_accum=1), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch).compile()
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out["xla_memory_mib"] = {k: getattr(mem, f"{k}_size_in_bytes") / 2**20
                             for k in ("argument", "output", "temp", "alias", "generated_code")}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops_per_step"] = float(cost.get("flops", float("nan"))) if cost else float("nan")

    holder = {"state": state}
    del state

    def one_step():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)
        return metrics

    t0 = time.perf_counter()
    losses = [float(one_step()["loss"]) for _ in range(args.warmup)]
    out["warmup_s"] = time.perf_counter() - t0
    out["step_s"] = timed_steps(one_step, args.steps)
    out["first_loss"] = losses[0] if losses else float("nan")

    if args.breakdown:
        out["breakdown_s"] = jaxtune_breakdown(args, cfg, holder["state"]["params"], frozen, batch, full)
    out["peak_rss_mib"] = peak_rss_mib()
    if args.profile:  # after the peak RSS: the profiler's own memory is not the step's
        out["profile"] = step_profile.profile_jax(compiled, one_step)
    return out


def jaxtune_breakdown(args, cfg, trainable, frozen, batch, full: bool) -> dict:
    """Median seconds of jitted pieces of the step (each compiled on its own)."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxtune import step
    from jaxtune.params import merge_trees
    from jaxtune.models.llama import Llama

    rng = jax.random.key(0)

    def forward(tr, fr, b):
        return Llama(cfg).apply({"params": merge_trees(tr, fr)}, b["tokens"], b["positions"], b["segment_ids"])[0]

    def hidden(tr, fr, b):  # up to the final norm: no lm_head
        from jaxtune.models.llama import Decoder
        params = merge_trees(tr, fr)
        return Decoder(cfg).apply({"params": params["model"]}, b["tokens"], b["positions"], b["segment_ids"],
                                  None, jnp.int32(0))[0]

    def loss(tr, fr, b):
        total, n = step.summed_loss(tr, fr, b, cfg, rng, True)
        return total / n

    def logits_ce(h, emb, targets):  # lm_head matmul + CE alone, forward
        logits = jnp.dot(h, emb.T)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

    pieces = {
        "decoder_forward (no lm_head)": jax.jit(hidden),
        "forward (logits)": jax.jit(forward),
        "forward + CE loss": jax.jit(loss),
        "value_and_grad (no optimizer)": jax.jit(jax.value_and_grad(loss)),
    }
    results = {}
    for name, fn in pieces.items():
        jax.block_until_ready(fn(trainable, frozen, batch))
        results[name] = statistics.median(
            timed_steps(lambda: jax.block_until_ready(fn(trainable, frozen, batch)), max(args.steps, 3)))
    # the lm_head + CE piece in isolation, forward and forward+backward wrt hidden states
    h = jax.block_until_ready(jax.jit(hidden)(trainable, frozen, batch))
    emb = merge_trees(trainable, frozen)["model"]["embed_tokens"]["embedding"]
    for name, fn in (("lm_head + CE forward", jax.jit(logits_ce)),
                     ("lm_head + CE fwd+bwd (d hidden)", jax.jit(jax.grad(logits_ce))),
                     ("lm_head + CE fwd+bwd (d hidden, d emb)", jax.jit(jax.grad(logits_ce, argnums=(0, 1))))):
        jax.block_until_ready(fn(h, emb, batch["targets"]))
        results[name] = statistics.median(
            timed_steps(lambda: jax.block_until_ready(fn(h, emb, batch["targets"])), max(args.steps, 3)))
    return results


# ============================================================================================
# HF transformers + PEFT (torch)


def run_hf(args, mode: str) -> dict:
    pin_threads(args.threads)
    import torch
    import transformers

    from jaxtune import hf
    from jaxtune.config import base_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = mode == "full"
    folder = hf.resolve_model_dir(args.model)
    t0 = time.perf_counter()
    if mode == "qlora":  # bitsandbytes' NF4 Linear4bit on CPU, as PEFT's QLoRA recipe loads it
        nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32)
        model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                              quantization_config=nf4, device_map="cpu")
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if not full:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                           target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                           task_type="CAUSAL_LM", use_dora=mode == "dora"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = base_config().optim
    if mode == "lora+":
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=o.lr, loraplus_lr_ratio=args.plus_ratio,
                                              loraplus_weight_decay=o.weight_decay, betas=(o.b1, o.b2), eps=o.eps)
    else:
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ids = torch.from_numpy(synthetic_tokens(args.batch, args.seq, model.config.vocab_size)).long()
    # HF shifts labels inside the loss: inputs = labels = ids[:, :-1] trains seq - 1 targets per row
    # (jaxtune: seq); both compute [batch, seq, V] logits.
    input_ids = ids[:, :-1].contiguous()
    load_s = time.perf_counter() - t0
    out = {"load_s": load_s, "load_rss_mib": current_rss_mib(),
           "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in model.parameters()),
           "attn_implementation": getattr(model.config, "_attn_implementation", "?")}

    def one_step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    losses = [one_step() for _ in range(args.warmup)]
    out["warmup_s"] = time.perf_counter() - t0
    out["step_s"] = timed_steps(one_step, args.steps)
    out["first_loss"] = losses[0] if losses else float("nan")
    out["peak_rss_mib"] = peak_rss_mib()
    if args.profile:  # after the peak RSS: the profiler's own memory is not the step's
        out["profile"] = step_profile.profile_torch(one_step)
    return out


# ============================================================================================
# Driver


def child_main(args) -> None:
    framework, mode = args.child.split(":")
    result = (run_jaxtune if framework == "jaxtune" else run_hf)(args, mode)
    print("RESULT " + json.dumps(result))


def run_child(argv: list[str], framework: str, mode: str) -> dict:
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--child={framework}:{mode}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", **os.environ})
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        return {"error": f"exit {proc.returncode}", "wall_s": wall}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(wall_s=wall, load1_before=load_before, load1_after=os.getloadavg()[0])
    return result


def summarise(runs: list[dict], tokens_per_step: int) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {}
    tps = [tokens_per_step / statistics.median(r["step_s"]) for r in ok]
    med = lambda key: statistics.median(r[key] for r in ok)
    s = {"tokens_s": statistics.median(tps), "tokens_s_min": min(tps), "tokens_s_max": max(tps),
         "step_s": tokens_per_step / statistics.median(tps), "peak_rss_mib": med("peak_rss_mib"),
         "load_rss_mib": med("load_rss_mib"), "warmup_s": med("warmup_s"), "load_s": med("load_s"),
         "trainable_params": ok[0]["trainable_params"], "runs": len(ok)}
    if "compile_s" in ok[0]:
        s["compile_s"] = med("compile_s")
        s["xla_memory_mib"] = ok[0]["xla_memory_mib"]
        s["flops_per_step"] = ok[0]["flops_per_step"]
    if "profile" in ok[0]:  # the first run's: profiles are shares within one run, not medians
        s["profile"] = ok[0]["profile"]
    if "breakdown_s" in ok[0]:
        s["breakdown_s"] = {k: statistics.median(r["breakdown_s"][k] for r in ok) for k in ok[0]["breakdown_s"]}
    return s


def fmt(x, spec) -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def markdown(args, summary: dict, loads: list[float]) -> str:
    tokens = args.batch * args.seq
    lines = [
        f"model `{args.model}` float32, batch {args.batch} x seq {args.seq} = {tokens} tokens/step, "
        f"{args.threads} threads, {args.steps} timed steps after {args.warmup} warm-up step(s), "
        f"median of {args.repeats} fresh processes per cell",
        f"machine: {os.cpu_count()} CPUs visible; 1-min load average during the runs "
        f"min {min(loads):.2f} / median {statistics.median(loads):.2f} / max {max(loads):.2f}",
        "",
        "| mode | framework | trainable params | tokens/s (median) | range | step s | peak RSS MiB "
        "| RSS after load MiB | compile s | warm-up s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in args.modes:
        for fw in args.frameworks:
            s = summary.get(f"{fw}:{mode}") or {}
            if not s:
                lines.append(f"| {mode} | {fw} | failed | | | | | | | |")
                continue
            lines.append(
                f"| {mode} | {fw} | {s['trainable_params']:,} | {s['tokens_s']:.0f} | "
                f"{s['tokens_s_min']:.0f}-{s['tokens_s_max']:.0f} | {s['step_s']:.2f} | {s['peak_rss_mib']:.0f} | "
                f"{s['load_rss_mib']:.0f} | {fmt(s.get('compile_s'), '.1f')} | {s['warmup_s']:.1f} |")
    if set(args.frameworks) == {"jaxtune", "hf"}:
        lines += ["", "| mode | tokens/s jaxtune / HF | peak RSS jaxtune / HF |", "| --- | ---: | ---: |"]
        for mode in args.modes:
            jt, hf = summary.get(f"jaxtune:{mode}") or {}, summary.get(f"hf:{mode}") or {}
            if jt and hf:
                lines.append(f"| {mode} | {jt['tokens_s'] / hf['tokens_s']:.2f}x | "
                             f"{jt['peak_rss_mib'] / hf['peak_rss_mib']:.2f}x |")
    for mode in args.modes:
        s = summary.get(f"jaxtune:{mode}") or {}
        if s.get("xla_memory_mib"):
            m = s["xla_memory_mib"]
            gflops = s["flops_per_step"] / 1e9
            lines.append("")
            lines.append(f"jaxtune {mode}: compiled step memory_analysis: arguments {m['argument']:.0f} MiB, "
                         f"outputs {m['output']:.0f} MiB (aliased {m['alias']:.0f}), temp {m['temp']:.0f} MiB; "
                         f"XLA cost_analysis {gflops:.0f} GFLOP/step = "
                         f"{gflops / s['step_s']:.0f} GFLOP/s achieved")
        if s.get("breakdown_s"):
            lines.append("")
            lines.append(f"jaxtune {mode} breakdown (median s, each piece jitted alone):")
            lines.append("")
            lines.append("| piece | s |")
            lines.append("| --- | ---: |")
            for k, v in s["breakdown_s"].items():
                lines.append(f"| {k} | {v:.3f} |")
            lines.append(f"| full train step | {s['step_s']:.3f} |")
    profiles = {key: s["profile"] for key, s in summary.items() if s and s.get("profile")}
    if profiles:
        lines += step_profile.markdown(profiles)
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    forward = [a for a in argv if not a.startswith("--json")]
    raw: dict[str, list[dict]] = {f"{fw}:{m}": [] for m in args.modes for fw in args.frameworks}
    load_start = load_averages()
    loads = [load_start[0]]
    for repeat in range(args.repeats):
        for mode in args.modes:
            for fw in args.frameworks:
                r = run_child(forward, fw, mode)
                raw[f"{fw}:{mode}"].append(r)
                loads += [r.get("load1_before", loads[-1]), r.get("load1_after", loads[-1])]
                steps = r.get("step_s")
                print(f"[repeat {repeat + 1}/{args.repeats}] {fw:8s} {mode:4s} "
                      + (f"median step {statistics.median(steps):.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                         f"load1 {r['load1_before']:.2f}->{r['load1_after']:.2f}" if steps else r.get("error", "?")),
                      file=sys.stderr, flush=True)
    summary = {k: summarise(v, args.batch * args.seq) for k, v in raw.items()}
    print(markdown(args, summary, loads))
    print(load_report(load_start, load_averages()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loadavg": loads, "summary": summary, "raw": raw}, f, indent=1)


if __name__ == "__main__":
    main()
