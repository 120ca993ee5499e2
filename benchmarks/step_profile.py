"""Where a training step's time goes, op by op, for jaxtune (XLA:CPU) and for HF + PEFT (torch).

bench_train.py --profile runs two more steps of each framework under its own profiler and reports,
per step, the wall time spent in three kinds of work:

  * matmuls: the dense dots of the layers and the output head (jaxtune: XLA's dot / YNNPACK fusions
    whose dots have no batch dimension; torch: aten::mm / addmm / matmul / linear kernels);
  * attention: the batched dots of attention (jaxtune) / torch's scaled_dot_product_attention and
    bmm kernels;
  * everything else: element-wise work, reductions, copies, the optimizer, the framework's own
    overhead between ops (torch: the step's wall time not inside any profiled op is counted here).

and the matmuls' FLOPs (jaxtune: from the compiled HLO's dot shapes; torch: the profiler's own
FLOP counts), so that their achieved GFLOP/s can be compared: both frameworks run float32 dots on
the same two cores, and a framework can only beat the other by the time it spends outside them
or by running them faster.

The jaxtune side reads the trace that jax.profiler writes (perfetto JSON): one event per executed
HLO instruction (thunk) on XLA's worker threads. Ops rarely overlap (XLA:CPU runs this step's
thunks one after another, each dot using the intra-op thread pool), so the sum of op times is close
to the step's wall time; the report prints both.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time

# ============================================================================================
# jaxtune: compiled HLO + jax.profiler trace

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])")
_DOT = re.compile(r"%([\w.\-]+) = (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)")
_FUSION = re.compile(r"%([\w.\-]+) = \S+ fusion\(.*?calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


def _dims(shape: str) -> list[int]:
    return [int(d) for d in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if d]


def hlo_dots(hlo_text: str) -> dict[str, dict]:
    """{instruction name: {"flops", "batched"}} for every dot and every fusion that contains dots.

    A fusion's entry sums the dots of the computation it calls; "batched" is true when a dot has
    batch dimensions (attention's q k^T and p v)."""
    shapes: dict[str, list[int]] = {}
    dots_in: dict[str, list[tuple[float, bool]]] = collections.defaultdict(list)  # by computation
    table: dict[str, dict] = {}  # the dots themselves, by instruction
    fusions: dict[str, str] = {}
    computation = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            computation = head.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m:
            shapes[m.group(1)] = _dims(m.group(2))
        f = _FUSION.search(line)
        if f:
            fusions[f.group(1)] = f.group(2)
        d = _DOT.search(line)
        if d:
            name, out_shape, lhs, _, attrs = d.groups()
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
            k = math.prod(shapes[lhs][int(i)] for i in contracting.split(",") if i) if lhs in shapes else 0
            flops = 2.0 * math.prod(_dims(out_shape)) * k
            batched = "lhs_batch_dims={" in attrs and "lhs_batch_dims={}" not in attrs
            dots_in[computation].append((flops, batched))
            table[name] = {"flops": flops, "batched": batched}
    for name, called in fusions.items():
        if dots_in.get(called):
            table[name] = {"flops": sum(f for f, _ in dots_in[called]),
                           "batched": any(b for _, b in dots_in[called])}
    return table


_NOT_OPS = re.compile(r"^(ThunkExecutor|while|conditional|call|SlinkyThreadPool|\$|end: )")


def _trace_events(trace_dir: str) -> list[dict]:
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    return data if isinstance(data, list) else data.get("traceEvents", [])


def summarise_jax_trace(events: list[dict], dots: dict[str, dict], steps: int, step_wall_s: float) -> dict:
    """Per-step seconds and FLOPs by kind from one jax.profiler trace of `steps` steps."""
    threads = {(e["pid"], e["tid"]): e["args"]["name"]
               for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    seconds = collections.Counter()
    flops = collections.Counter()
    other_ops = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "XLA" not in threads.get((e["pid"], e["tid"]), ""):
            continue
        name = e["name"]
        if _NOT_OPS.match(name):
            continue
        dur = e.get("dur", 0) / 1e6
        dot = dots.get(name)
        kind = "other" if dot is None else ("attention" if dot["batched"] else "matmul")
        seconds[kind] += dur
        if dot is not None:
            flops[kind] += dot["flops"]
        else:
            other_ops[re.sub(r"[._]\d+$", "", name)] += dur
    return _per_step(seconds, flops, other_ops, steps, step_wall_s)


def profile_jax(compiled, run_step, steps: int = 2) -> dict:
    """Profile `steps` calls of run_step (which runs `compiled` and blocks) under jax.profiler."""
    import jax

    dots = hlo_dots(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run_step()
        wall = (time.perf_counter() - start) / steps
        events = _trace_events(trace_dir)
    return summarise_jax_trace(events, dots, steps, wall)


# ============================================================================================
# HF + PEFT: torch.profiler

_TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_addmm_activation"}
_TORCH_ATTENTION = {"aten::bmm", "aten::baddbmm", "aten::scaled_dot_product_attention",
                    "aten::_scaled_dot_product_flash_attention_for_cpu",
                    "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def profile_torch(run_step, steps: int = 2) -> dict:
    """Profile `steps` calls of run_step under torch.profiler (CPU, FLOPs counted)."""
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            run_step()
    wall = (time.perf_counter() - start) / steps
    seconds = collections.Counter()
    flops = collections.Counter()
    other_ops = collections.Counter()
    for avg in prof.key_averages():
        name = avg.key
        self_s = avg.self_cpu_time_total / 1e6
        kind = "matmul" if name in _TORCH_MATMUL else "attention" if name in _TORCH_ATTENTION else "other"
        seconds[kind] += self_s
        flops[kind] += avg.flops or 0
        if kind == "other":
            other_ops[name] += self_s
    # The step's wall time outside every profiled op (Python, autograd bookkeeping) is "other" too.
    outside = max(0.0, wall * steps - sum(seconds.values()))
    seconds["other"] += outside
    other_ops["(outside any op)"] += outside
    return _per_step(seconds, flops, other_ops, steps, wall)


def _per_step(seconds, flops, other_ops, steps: int, wall: float) -> dict:
    return {
        "step_wall_s": wall,
        "seconds": {k: seconds[k] / steps for k in ("matmul", "attention", "other")},
        "gflop": {k: flops[k] / steps / 1e9 for k in ("matmul", "attention")},
        "top_other": [[name, s / steps] for name, s in other_ops.most_common(6)],
    }


def markdown(profiles: dict[str, dict]) -> list[str]:
    """Rows of a table: one per framework:mode with a profile."""
    lines = ["", "Where a step's time goes (`--profile`: 2 steps under each framework's profiler; seconds per step;"
             " GFLOP/s = the kind's FLOPs / its seconds):", "",
             "| run | step s (profiled) | matmuls s | GFLOP | GFLOP/s | attention s | everything else s |"
             " largest other work |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, p in profiles.items():
        s, g = p["seconds"], p["gflop"]
        rate = g["matmul"] / s["matmul"] if s["matmul"] else float("nan")
        top = ", ".join(f"{n} {t:.2f}" for n, t in p["top_other"][:3])
        lines.append(f"| {key} | {p['step_wall_s']:.2f} | {s['matmul']:.2f} | {g['matmul']:.0f} | {rate:.0f} | "
                     f"{s['attention']:.2f} | {s['other']:.2f} | {top} |")
    return lines
