"""Fit the analytic plan's per-platform constants (jaxtune/plan/estimate.py, HABITS) to the real compilers.

    python benchmarks/fit_plan.py                  # compile what the cache lacks, fit, print constants + table
    python benchmarks/fit_plan.py --write          # ... and write jaxtune/plan/compiler_habits.json
    python benchmarks/fit_plan.py --no-compile     # fit what the cache holds (cases without figures are left out)
    python benchmarks/fit_plan.py --only=8b        # compile only the cases whose name contains a substring

What it compiles (GRID): today's `jaxtune.step.train_step`, through `jaxtune.plan.compile_step` (the jit
jaxtune.train runs), over each case's abstract train state; nothing is allocated. TPU cases compile
deviceless through libtpu (no TPU needed), `cpu` cases with XLA:CPU on one CPU device. The grid varies
what each habit multiplies, so that every constant is pinned by some case rather than left to its
bounds: LoRA and full fine-tuning (the optimizer's update temporaries scale with the trained weights),
every remat policy, rows per device and sequence length (activations grow with T, the attention's
score buffers with T^2, the chunked cross-entropy with neither once T is chunked), layer count at a
fixed size (per-layer terms against one-layer terms), FSDP against data parallelism on the same chips
(the all-gathered weight copies exist only under FSDP), LoRA dropout on and off, a tiny model and
Llama-3.1-8B's widths (layers reduced to 2 and 4: the scanned layer body compiles once whatever the
count, and per-layer terms stay identifiable from the difference).

Fit: per platform, the largest relative error of the per-device total over the compiled cases,
    (counted state + sum_h habit_h * unit_h(case) - compiled_total) / compiled_total
minimised within each habit's bounds (a linear program, scipy.optimize.linprog: the tests hold every
case to 15%, so the fit minimises the worst case rather than the mean square; units from `estimate.counted_units`, the function
the estimate itself uses). It prints the constants (and which sit on a bound), and a per-case table:
estimate, compiler, error, and the error when that case is left out of the fit (how the fit does on a
program it has not seen).

Cache: benchmarks/fit_plan_compiled.json keeps each case's compiled figures with a fingerprint of the
sources that define the program (jaxtune/step.py, models/, state.py, optim.py, sharding.py, params.py,
plan/compiled.py, plan/run.py) and the jax / libtpu versions; a case whose fingerprint differs is
compiled again, so a refit after an unrelated change compiles nothing.

Cost, measured on this repository's 2-core machine: see README ("Will it fit?"). The 8B-wide TPU compiles
take most of it; each process stays under ~3 GiB (printed at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from scipy.optimize import linprog

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxtune import hf, sharding  # noqa: E402
from jaxtune.config import base_config  # noqa: E402
from jaxtune.plan import compiled as compiled_lib  # noqa: E402
from jaxtune.plan import estimate, measured, targets  # noqa: E402
from jaxtune.plan.calibration import ARCHS  # noqa: E402  (tiny-tpu, tiny-cpu: tests/test_plan.py's too)
from jaxtune.plan.run import Run  # noqa: E402
from machine_load import load_averages, load_report  # noqa: E402  (benchmarks/, the script's folder)

CACHE = REPO / "benchmarks" / "fit_plan_compiled.json"
PROGRAM_SOURCES = ("jaxtune/step.py", "jaxtune/models", "jaxtune/state.py", "jaxtune/optim.py", "jaxtune/sharding.py",
                   "jaxtune/params.py", "jaxtune/plan/compiled.py", "jaxtune/plan/run.py")



@dataclasses.dataclass(frozen=True)
class Case:
    target: str  # 'tpu:v5e-4', 'cpu'
    arch: str  # a key of ARCHS, or 'arch:NAME' (a shipped architecture)
    lora: bool
    remat: str
    batch: int
    seq: int
    layers: int | None = None  # override the architecture's layer count
    mesh: str = "1,-1,1"  # data, fsdp, tensor
    dropout: float = 0.0
    targets: str = "all-linear"
    rank: int = 16

    @property
    def platform(self) -> str:
        return "cpu" if self.target == "cpu" else "tpu"

    @property
    def name(self) -> str:
        arch = self.arch.removeprefix("arch:")
        parts = [self.target, f"{arch}" + (f"-L{self.layers}" if self.layers else ""), "lora" if self.lora else "full",
                 f"remat-{self.remat}", f"{self.batch}x{self.seq}"]
        if self.mesh != "1,-1,1":
            parts.append(f"mesh-{self.mesh.replace(',', '.')}")
        if self.dropout:
            parts.append(f"dropout-{self.dropout}")
        if self.targets != "all-linear":
            parts.append(self.targets.replace(",", "+"))
        if self.lora and self.rank != 16:
            parts.append(f"r{self.rank}")
        return " ".join(parts)


def _grid() -> list[Case]:
    tpu, cpu, big = "tpu:v5e-4", "cpu", "arch:llama-3.1-8b"
    lora, full = True, False
    cases = [
        # tiny on v5e-4, FSDP over the 4 chips unless said: rows per chip, tokens, LoRA and full
        Case(tpu, "tiny-tpu", lora, "none", 8, 512), Case(tpu, "tiny-tpu", lora, "none", 16, 512),
        Case(tpu, "tiny-tpu", lora, "full", 8, 512), Case(tpu, "tiny-tpu", full, "full", 8, 512),
        Case(tpu, "tiny-tpu", full, "none", 8, 512), Case(tpu, "tiny-tpu", lora, "none", 8, 1024),
        Case(tpu, "tiny-tpu", lora, "full", 16, 1024),
        # the same chips as data parallelism (no all-gathered weights); 8 layers (per-layer terms)
        Case(tpu, "tiny-tpu", lora, "none", 8, 512, mesh="-1,1,1"), Case(tpu, "tiny-tpu", full, "full", 8, 512, mesh="-1,1,1"),
        Case(tpu, "tiny-tpu", lora, "none", 8, 512, layers=8), Case(tpu, "tiny-tpu", full, "full", 8, 512, layers=8),
        # the dots policies at two lengths (attention's batched dots are T^2), LoRA dropout
        Case(tpu, "tiny-tpu", lora, "dots_no_batch", 8, 512), Case(tpu, "tiny-tpu", lora, "dots", 8, 512),
        Case(tpu, "tiny-tpu", lora, "dots", 8, 1024), Case(tpu, "tiny-tpu", lora, "dots_no_batch", 8, 1024),
        Case(tpu, "tiny-tpu", lora, "none", 8, 512, dropout=0.05), Case(tpu, "tiny-tpu", lora, "full", 8, 512, dropout=0.05),
    ]
    # Llama-3.1-8B widths at 2048 tokens, 2 and 4 layers: LoRA on v5e-8 (FSDP 8), full on v5p-8 (FSDP 4), the
    # README's LoRA recipe (r8, the embedding and head too, dropout 0.05), remat none
    for layers in (2, 4):
        cases += [Case("tpu:v5e-8", big, lora, "full", 16, 2048, layers=layers),
                  Case("tpu:v5p-8", big, full, "full", 16, 2048, layers=layers)]
    # ... and all 32 layers, the configs tests/test_plan.py checks (a compile takes about a minute here when quiet):
    # per-layer terms measured at full depth, not only extrapolated from 2 and 4
    cases += [Case("tpu:v5e-8", big, lora, "full", 16, 2048), Case("tpu:v5p-8", big, full, "full", 16, 2048)]
    cases += [Case("tpu:v5e-8", big, lora, "full", 16, 2048, layers=2, dropout=0.05,
                   targets="all-linear,embed_tokens,lm_head", rank=8),
              Case("tpu:v5e-8", big, lora, "none", 8, 2048, layers=2)]
    # XLA:CPU, one device, float32
    cases += [
        Case(cpu, "tiny-cpu", lora, "none", 8, 512), Case(cpu, "tiny-cpu", lora, "none", 4, 1024),
        Case(cpu, "tiny-cpu", lora, "full", 8, 512), Case(cpu, "tiny-cpu", lora, "full", 4, 1024),
        Case(cpu, "tiny-cpu", full, "none", 8, 512), Case(cpu, "tiny-cpu", full, "full", 8, 512),
        Case(cpu, "tiny-cpu", full, "none", 4, 1024), Case(cpu, "tiny-cpu", lora, "none", 8, 512, layers=8),
        Case(cpu, "tiny-cpu", lora, "dots", 8, 512), Case(cpu, "tiny-cpu", lora, "dots_no_batch", 8, 512),
        Case(cpu, "tiny-cpu", lora, "none", 8, 512, dropout=0.05),
        Case(cpu, big, lora, "full", 1, 2048, layers=2), Case(cpu, big, lora, "full", 1, 2048, layers=4),
    ]
    return cases


GRID = _grid()


# --------------------------------------------------------------------------------------------
# Runs and compiles


def arch_folder(case: Case, scratch: pathlib.Path) -> pathlib.Path:
    """A folder holding the case's config.json (a shipped architecture with its layer count overridden)."""
    if case.arch in ARCHS:
        arch = dict(ARCHS[case.arch])
    else:
        arch = json.loads((hf.resolve_model_dir(case.arch, config_only=True) / "config.json").read_text())
    if case.layers:
        arch["num_hidden_layers"] = case.layers
    folder = scratch / hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(arch))
    return folder


def case_run(case: Case, scratch: pathlib.Path) -> Run:
    config = base_config()
    config.model.path = str(arch_folder(case, scratch))
    config.model.dtype = config.model.compute_dtype = "float32" if case.platform == "cpu" else "bfloat16"
    config.model.remat = case.remat
    config.lora.enabled = case.lora
    config.lora.targets = case.targets
    config.lora.rank = case.rank
    config.lora.dropout = case.dropout
    config.train.batch_size = case.batch
    config.data.max_len = case.seq
    config.mesh.shape = case.mesh
    return Run.from_config(config)


def case_devices(case: Case) -> list:
    if case.platform == "cpu":
        return jax.devices("cpu")[:1]  # `cpu` as users have it: one CPU device
    return targets.target_devices(targets.parse_target(case.target))


def program_fingerprint() -> str:
    """Hash of the sources that define the compiled program, and the compilers' versions."""
    digest = hashlib.sha256()
    for source in PROGRAM_SOURCES:
        path = REPO / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(REPO).as_posix().encode() + file.read_bytes())
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    return digest.hexdigest()[:16]


def compile_case(case: Case, run: Run) -> dict:
    """The compiler's per-device figures of the case (or its refusal), with the compile's seconds."""
    start = time.perf_counter()
    try:
        figures = {"compiled": compiled_lib.compiled_figures(compiled_lib.compile_step(run, case_devices(case)))}
    except Exception as e:  # the TPU compiler refuses a program that does not fit in HBM
        if not compiled_lib.is_out_of_memory(e):
            raise
        figures = {"refused": str(e).strip().splitlines()[0][:300],
                   "refused_temp": compiled_lib.refused_temporaries_bytes(e)}
    figures["compile_seconds"] = round(time.perf_counter() - start, 1)
    return figures


def case_units(case: Case, run: Run) -> dict[str, float]:
    mesh = sharding.make_mesh(run.config.mesh.shape, devices=case_devices(case))
    return estimate.counted_units(run, mesh)


# --------------------------------------------------------------------------------------------
# The fit


def counted_bytes(units: dict[str, float]) -> float:
    return sum(units[term] for term in estimate.COUNTED_TERMS + ("batch",))


def fit_platform(rows: list[dict]) -> tuple[dict[str, float], list[str]]:
    """Habits minimising the largest relative error of the totals over `rows` ({units, compiled}), within
    bounds (a linear program: the estimate is linear in the habits); habits whose unit is 0 in every row
    are not exercised: they count their buffers once (1, or the nearest bound)."""
    names = list(estimate.HABITS)
    A = np.array([[row["units"][estimate.HABITS[n].unit] / row["compiled"] for n in names] for row in rows])
    b = np.array([(row["compiled"] - counted_bytes(row["units"])) / row["compiled"] for row in rows])
    used = [j for j in range(len(names)) if np.any(A[:, j])]
    lower = np.array([estimate.HABITS[names[j]].bounds[0] for j in used])
    upper = np.array([estimate.HABITS[names[j]].bounds[1] for j in used])
    solution = minimax_fit(A[:, used], b, lower, upper)
    habits = {name: min(max(1.0, estimate.HABITS[name].bounds[0]), estimate.HABITS[name].bounds[1]) for name in names}
    habits.update({names[j]: float(np.round(value, 3)) for j, value in zip(used, solution)})
    unused = [name for j, name in enumerate(names) if j not in used]
    return habits, unused


def minimax_fit(A: np.ndarray, b: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """x in [lower, upper] minimising max_i |A_i x - b_i|: minimise t subject to -t <= A x - b <= t. The
    tests hold every case to 15%, so the fit minimises the worst case, not the mean square (whose
    optimum can leave one case far off to bring several others closer)."""
    rows, cols = A.shape
    cost = np.zeros(cols + 1)
    cost[-1] = 1.0
    ones = np.ones((rows, 1))
    bound_rows = np.vstack([np.hstack([A, -ones]), np.hstack([-A, -ones])])
    bound_values = np.concatenate([b, -b])
    result = linprog(cost, A_ub=bound_rows, b_ub=bound_values, bounds=[*zip(lower, upper), (0, None)], method="highs")
    if not result.success:  # bounds are always feasible for x; t absorbs any error, so this is a solver failure
        raise RuntimeError(f"fit_plan: the minimax fit failed: {result.message}")
    return result.x[:cols]


def estimated_total(units: dict[str, float], habits: dict[str, float]) -> float:
    return estimate.weigh(units, habits)["total"]


def fit(records: list[dict]) -> dict:
    """Per platform: the habits, the unexercised ones, and per case estimate / compiled / errors."""
    result = {}
    for platform in sorted({r["platform"] for r in records}):
        rows = [r for r in records if r["platform"] == platform and r.get("compiled")]
        if not rows:
            continue
        habits, unused = fit_platform(rows)
        table = []
        for i, row in enumerate(rows):
            held_out = fit_platform(rows[:i] + rows[i + 1:])[0] if len(rows) > 1 else habits
            table.append({"case": row["case"], "compiled": row["compiled"],
                          "estimate": estimated_total(row["units"], habits),
                          "estimate_left_out": estimated_total(row["units"], held_out)})
        for row in (r for r in records if r["platform"] == platform and not r.get("compiled")):
            table.append({"case": row["case"], "compiled": None, "refused": row.get("refused_temp"),
                          "estimate": estimated_total(row["units"], habits)})
        errors = [t["estimate"] / t["compiled"] - 1 for t in table if t["compiled"]]
        result[platform] = {"habits": habits, "not_exercised": unused, "cases": table,
                            "max_abs_error": max(map(abs, errors)), "rms_error": float(np.sqrt(np.mean(np.square(errors))))}
    return result


def print_fit(result: dict) -> None:
    for platform, fitted in result.items():
        print(f"\n## {platform}: {len(fitted['cases'])} cases; error of the total: max {fitted['max_abs_error']:.1%}, "
              f"rms {fitted['rms_error']:.1%}\n")
        for name, value in fitted["habits"].items():
            lo, hi = estimate.HABITS[name].bounds
            note = (" (not exercised by the compiled cases: counted once)" if name in fitted["not_exercised"]
                    else " (at a bound)" if value in (lo, hi) else "")
            print(f"  {name:20s} {value:7.3f}   [{lo}, {hi}]{note}   {estimate.HABITS[name].meaning}")
        print("\n| case | compiler MiB | estimate MiB | error | error, case left out of the fit |\n| --- | ---: | ---: | ---: | ---: |")
        for t in fitted["cases"]:
            if t["compiled"] is None:
                refused = f"refused (temporaries {t['refused'] / 2**20:.0f})" if t.get("refused") else "refused"
                print(f"| {t['case']} | {refused} | {t['estimate'] / 2**20:.0f} | - | - |")
                continue
            print(f"| {t['case']} | {t['compiled'] / 2**20:.0f} | {t['estimate'] / 2**20:.0f} | "
                  f"{t['estimate'] / t['compiled'] - 1:+.1%} | {t['estimate_left_out'] / t['compiled'] - 1:+.1%} |")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_habits(result: dict, fingerprint: str, not_compiled: list[str]) -> None:
    document = {
        "command": "python benchmarks/fit_plan.py --write",
        "commit": git_commit(),
        "program_fingerprint": fingerprint,
        "versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")},
        "habits": {platform: fitted["habits"] for platform, fitted in result.items()},
        "fit": {platform: {"cases": len(fitted["cases"]), "max_abs_error": round(fitted["max_abs_error"], 4),
                           "rms_error": round(fitted["rms_error"], 4), "not_exercised": fitted["not_exercised"]}
                for platform, fitted in result.items()},
        "grid_cases_not_compiled": not_compiled,
    }
    estimate.HABITS_FILE.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {estimate.HABITS_FILE.relative_to(REPO)}")


def save_to_cache(name: str, figures: dict) -> None:
    """Add one case to the cache file as it is now (several fits may run at once, on disjoint --only)."""
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    cache[name] = figures
    CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write jaxtune/plan/compiler_habits.json")
    parser.add_argument("--no-compile", action="store_true", help="fit the cached figures only")
    parser.add_argument("--only", default="", help="compile only cases whose name contains this (fit uses all cached)")
    parser.add_argument("--json", default="", help="also write the fit (constants and per-case table) here")
    args = parser.parse_args(argv)
    load_start = load_averages()
    fingerprint = program_fingerprint()
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for case in GRID:
            run = case_run(case, pathlib.Path(scratch))
            cached = cache.get(case.name)
            if (cached is None or cached["fingerprint"] != fingerprint) and not args.no_compile and args.only in case.name:
                print(f"compiling {case.name} ...", end=" ", flush=True)
                cached = cache[case.name] = {**compile_case(case, run), "fingerprint": fingerprint}
                print(f"{cached['compile_seconds']} s", flush=True)
                save_to_cache(case.name, cached)
            if cached is None or cached["fingerprint"] != fingerprint:
                continue
            figures = cached.get("compiled", {})
            records.append({"case": case.name, "platform": case.platform, "units": case_units(case, run),
                            "compiled": figures.get("total"), "refused_temp": cached.get("refused_temp")})
    missing = len(GRID) - len(records)
    if missing:
        print(f"\n{missing} of {len(GRID)} cases have no compiled figures of today's program (not fitted)")
    result = fit(records)
    print_fit(result)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.write:
        write_habits(result, fingerprint, [case.name for case in GRID if case.name not in {r["case"] for r in records}])
    print(f"\npeak resident memory of this process: {measured.peak_rss_bytes() / 2**30:.2f} GiB")
    print(load_report(load_start, load_averages()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
