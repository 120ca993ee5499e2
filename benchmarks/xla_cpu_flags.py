"""XLA:CPU flag variants on jaxtune's CPU work: the dots of a training step, the train step, inference.

    python benchmarks/xla_cpu_flags.py [--workload=dots|lora|full|inference] \
        [--variants=default,eigen,onednn_dot,...] [--rounds=3] [--threads=2] [--calls=20]

Every (variant, round) runs in its own fresh process (XLA_FLAGS is read once, when jax starts its CPU
backend) with XLA_FLAGS = the caller's XLA_FLAGS + the variant's flags, pinned to `threads` cores.
Rounds alternate the variants (A B C A B C ...) so drift in the machine's load hits them alike.
Every timed call records its wall time and the process CPU time (all threads): on a shared machine
the CPU time per call is the steadier measure of the work a variant costs (wall time counts the time
other jobs hold the cores); a variant that really is faster must win on both.
  * dots: every dot of a LoRA/full step of SmolLM2-135M at batch 4 x 256 (the forward's x W, the
    backward's dy W^T and x^T dy, an attention score dot), `calls` jitted calls after a warm-up: the
    minimum wall and CPU time, the largest error relative to a float64 product (|err| / (|x| |W|)),
    and which kernel XLA chose (a `__ynn_fusion` / `__xnn_fusion` / oneDNN call in the compiled HLO,
    or XLA's own dot);
  * lora, full: bench_train.py's jaxtune step in that mode (its defaults: batch 4 x 256, float32,
    AdamW) run by bench_train's own `run_jaxtune`, `--calls` timed steps: median wall and CPU
    seconds per step, and the first step's loss (the numerics check);
  * inference: bench_inference.py's jaxtune side (`run_jaxtune`: forward 8 x 256, greedy decode at
    batch 1 and 8), best wall time and its CPU time.
The table shows the median over rounds per variant; the load averages are printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from machine_load import load_averages, load_report

# name -> flags appended to XLA_FLAGS (values as debug_options_flags.cc of jaxlib 0.10.2 parses them).
# In jaxlib 0.10.2 the default already sends float32 dots that YNNPACK supports (not x^T dy, whose
# lhs is transposed) to YNNPACK (xla_cpu_experimental_ynn_fusion_type=individual_dot). Left out, as
# they change nothing here: xla_cpu_experimental_xnn_fusion_type=dot (XLA makes no XNNPACK fusion of
# these dots), xla_cpu_use_onednn without a oneDNN fusion type, xla_cpu_experimental_onednn_custom_call
# (no rewrite of these dots); xla_cpu_enable_custom_matmul_tiling and xla_cpu_matmul_tiling_* are
# reserved (removed) fields in this version; xla_cpu_enable_fast_math changes numerics.
VARIANTS = {
    "default": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=",  # no YNNPACK: XLA's Eigen dot
    "ynn_fusions": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot,eltwise,reduce",
    "xnn_greedy": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_graph_fusion_mode="
                  "XNN_GRAPH_FUSION_MODE_GREEDY",
    # oneDNN matmuls; jaxlib 0.10.2 dies compiling the train step with it ("partition compile failed")
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true "
                  "--xla_cpu_experimental_onednn_fusion_type=dot",
    "vec512": "--xla_cpu_prefer_vector_width=512",  # 512-bit vectors in XLA's own loops (default 256)
    "no_conc_sched": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
}

# (name, lhs shape, rhs shape, lhs contracting dim, rhs contracting dim, batch dims)
DOTS = (
    ("x W [1024,576]x[576,1536]", (1024, 576), (576, 1536), 1, 0, 0),
    ("x W [1024,1536]x[1536,576]", (1024, 1536), (1536, 576), 1, 0, 0),
    ("dy W^T [1024,1536]x[576,1536]^T", (1024, 1536), (576, 1536), 1, 1, 0),
    ("x^T dy [1024,576]^Tx[1024,1536]", (1024, 576), (1024, 1536), 0, 0, 0),
    ("q k^T [36,256,64]x[36,256,64]^T", (36, 256, 64), (36, 256, 64), 2, 2, 1),
)


WORKLOADS = ("dots", "lora", "full", "inference")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="dots", choices=WORKLOADS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant, interleaved")
    parser.add_argument("--calls", type=int, default=20,
                        help="timed calls per dot (dots) / timed steps (lora, full) / repeats (inference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown variant {v!r} ({', '.join(VARIANTS)})")
    return args


def kernel_of(hlo_text: str) -> str:
    """Which library the compiled HLO calls for its dot."""
    for marker, name in (("__ynn_fusion", "ynnpack"), ("__xnn_fusion", "xnnpack"), ("onednn", "onednn")):
        if marker in hlo_text:
            return name
    return "xla"


def measure_dot(spec, calls: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    name, lhs_shape, rhs_shape, lhs_c, rhs_c, batch = spec
    rng = np.random.default_rng(0)
    lhs_np = rng.standard_normal(lhs_shape).astype(np.float32)
    rhs_np = rng.standard_normal(rhs_shape).astype(np.float32)
    dims = (((lhs_c,), (rhs_c,)), ((0,), (0,)) if batch else ((), ()))
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
    lhs, rhs = jnp.asarray(lhs_np), jnp.asarray(rhs_np)
    compiled = fn.lower(lhs, rhs).compile()
    out = np.asarray(compiled(lhs, rhs))
    exact = np.einsum(*einsum_args(lhs_np.astype(np.float64), rhs_np.astype(np.float64), lhs_c, rhs_c, batch))
    scale = np.einsum(*einsum_args(np.abs(lhs_np).astype(np.float64), np.abs(rhs_np).astype(np.float64),
                                   lhs_c, rhs_c, batch))
    records: list = []
    timing_recorder(records, warmup=False)(lambda: compiled(lhs, rhs).block_until_ready(), calls)
    (walls, cpus), = records
    return {"kernel": kernel_of(compiled.as_text()), "wall_s": min(walls), "cpu_s": min(cpus),
            "gflop": 2 * out.size * lhs_shape[lhs_c] / 1e9, "rel_err": float(np.max(np.abs(out - exact) / scale))}


def einsum_args(lhs, rhs, lhs_c: int, rhs_c: int, batch: int):
    """np.einsum subscripts + operands for the dot_general of DOTS."""
    if batch:
        return "bik,bjk->bij", lhs, rhs
    lhs_sub = "mk" if lhs_c == 1 else "km"
    rhs_sub = "kn" if rhs_c == 0 else "nk"
    return f"{lhs_sub},{rhs_sub}->mn", lhs, rhs


def timing_recorder(records: list, warmup: bool):
    """A timing loop (a stand-in for the benchmarks' own) that also records process CPU time per call."""

    def timed_calls(fn, n: int):
        walls, cpus = [], []
        if warmup:
            fn()
        for _ in range(n):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
        records.append((walls, cpus))
        return walls

    return timed_calls


def train_child(args) -> dict:
    import bench_train

    records: list = []
    bench_train.timed_steps = timing_recorder(records, warmup=False)  # run_jaxtune runs its warm-up step first
    bench_args = bench_train.parse_args([f"--steps={args.calls}", "--warmup=1", f"--threads={args.threads}"])
    out = bench_train.run_jaxtune(bench_args, args.workload)
    (walls, cpus), = records
    return {f"{args.workload} train step": {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                                            "loss": out["first_loss"], "compile_s": out["compile_s"]}}


def inference_child(args) -> dict:
    import bench_inference

    records: list = []
    timed_calls = timing_recorder(records, warmup=True)

    def timed(fn, repeats):
        walls = timed_calls(fn, repeats)
        return min(walls), min(walls)

    bench_inference.timed = timed
    bench_args = bench_inference.parse_args([f"--repeats={args.calls}", f"--threads={args.threads}"])
    bench_inference.run_jaxtune(bench_args)
    names = ["forward 8x256"] + [f"decode batch {b}" for b in bench_args.decode_batches]
    return {name: {"wall_s": min(walls), "cpu_s": cpus[walls.index(min(walls))]}
            for name, (walls, cpus) in zip(names, records)}


def dots_child(args) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cores)
    return {spec[0]: measure_dot(spec, args.calls) for spec in DOTS}


def child_main(args) -> None:
    child = {"dots": dots_child, "lora": train_child, "full": train_child, "inference": inference_child}[args.workload]
    print("RESULT " + json.dumps(child(args)))


def run_child(variant: str, args) -> dict:
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), VARIANTS[variant]) if f)
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={variant}", f"--workload={args.workload}",
           f"--calls={args.calls}", f"--threads={args.threads}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(f"variant {variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}\n")
        return {}
    return json.loads(lines[-1][len("RESULT "):])


def table_row(measure: str, variant: str, cells: list[dict], baseline: list[dict]) -> str:
    med = lambda rows, key: statistics.median(c[key] for c in rows)
    ratio = lambda key: med(baseline, key) / med(cells, key) if baseline else float("nan")
    extra = ""
    if "kernel" in cells[0]:
        extra = (f" {cells[0]['kernel']} | {cells[0]['gflop'] / med(cells, 'wall_s'):.0f} | "
                 f"{max(c['rel_err'] for c in cells):.1e} |")
    elif "loss" in cells[0]:
        extra = f" {cells[0]['loss']:.6f} | {med(cells, 'compile_s'):.0f} |"
    return (f"| {measure} | {variant} | {med(cells, 'wall_s') * 1e3:.1f} | {ratio('wall_s'):.2f}x | "
            f"{med(cells, 'cpu_s') * 1e3:.1f} | {ratio('cpu_s'):.2f}x |{extra}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    start = load_averages()
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    loads = []
    for round_ in range(args.rounds):
        for variant in args.variants:
            loads.append(os.getloadavg()[0])
            result = run_child(variant, args)
            if result:
                runs[variant].append(result)
            print(f"[round {round_ + 1}/{args.rounds}] {variant}: "
                  + ", ".join(f"{k} {v['wall_s'] * 1e3:.1f} ms wall / {v['cpu_s'] * 1e3:.1f} ms CPU"
                              for k, v in result.items()), file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])
    print(f"workload {args.workload}; XLA_FLAGS of the caller: {os.environ.get('XLA_FLAGS', '')!r}; "
          f"{args.threads} threads, {args.calls} timed calls per process, median over {args.rounds} "
          f"interleaved fresh processes per variant; 1-min load min {min(loads):.2f} / "
          f"median {statistics.median(loads):.2f} / max {max(loads):.2f}")
    for variant in args.variants:
        print(f"  {variant}: {VARIANTS[variant] or '(no flags)'}")
    print()
    header = "| measure | variant | ms (wall) | speed-up (wall) | CPU ms | speed-up (CPU) |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: |"
    if args.workload == "dots":
        header, rule = header + " kernel | GFLOP/s | max rel err |", rule + " --- | ---: | ---: |"
    elif args.workload in ("lora", "full"):
        header, rule = header + " first loss | compile s |", rule + " ---: | ---: |"
    print(header)
    print(rule)
    measures = next((list(r[0]) for r in runs.values() if r), [])
    baseline_variant = args.variants[0]
    for measure in measures:
        for variant in args.variants:
            cells = [r[measure] for r in runs[variant] if measure in r]
            if cells:
                print(table_row(measure, variant, cells, [r[measure] for r in runs[baseline_variant]]))
            else:
                print(f"| {measure} | {variant} | failed | | | |")
    print()
    print(f"speed-up: {baseline_variant}'s median time / the variant's (above 1: the variant is faster)")
    print(load_report(start, load_averages()))


if __name__ == "__main__":
    main()
