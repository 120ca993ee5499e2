"""Many LoRA adapters over one base model: the adapter bank read by batched multi-adapter decoding.

    from jaxtune import generate, loading, multi_adapter
    model = loading.load("smollm2-135m-instruct")
    bank = multi_adapter.AdapterBank.from_dirs(model.cfg, {"sql": "runs/sql", "chat": "peft/chat"})
    generate.generate_with_adapters(model, bank, prompts_ids, ["sql", None, "chat"], max_new_tokens=64)

An adapter is a PEFT LoRA folder or a jaxtune LoRA run (workdir, its last checkpoint), each with its
own rank, alpha, rsLoRA and targets. The bank has `capacity` slots (slot 0 is the base model, every
other slot names one adapter) and `columns` rank columns shared by them, packed: an adapter of rank r
takes r free columns, in every target. For every linear target in the bank (the union of its
adapters' targets, or a fixed set for a server that loads adapters later) it holds

    a [L, in, C]  and  b [L, C, out]      (C = columns; each adapter's scaling folded into its rows of b)

with zeros in free columns and where an adapter does not adapt that target. Ranks are not padded to
the largest and the base owns no column, so a bank of adapters of ranks 4/8/16 costs what their ranks
sum to. `params(base_params, rows_B)` puts these leaves next to each target's kernel, with the slot of
each batch row and the slot of each column; `jaxtune.models.multi_lora` computes the per-row delta.
Adding or removing an adapter writes its columns and keeps every shape, so nothing is recompiled.

Limits: linear targets only (q/k/v/o/gate/up/down_proj): adapters of embed_tokens or lm_head, and runs
that added tokens, are refused with an error; every adapter shares the base model's tokenizer.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import lora, loading
from jaxtune import params as params_lib
from jaxtune import peft as peft_io
from jaxtune import workdir as workdir_lib
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import ADAPTER_DTYPE, LINEAR_TARGETS, LoRAConfig, ModelConfig
from jaxtune.models.multi_lora import BANK_A, BANK_B, COLUMNS, ROW_COLUMNS, ROWS

log = logging.getLogger("jaxtune.multi_adapter")

BASE_SLOT = 0
FREE_COLUMN = -1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")


class AdapterError(JaxtuneError, ValueError):
    """An adapter cannot join the bank (unknown, unsupported, too large, a name taken); the message says why."""


def parse_adapter_specs(spec: str) -> dict[str, str]:
    """'NAME=DIR,NAME=DIR' (vLLM's --lora-modules style) -> {name: dir}, in order."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise AdapterError(f"--adapters: {item!r} is not NAME=DIR (e.g. --adapters=sql=runs/sql,chat=peft/chat)")
        name = name.strip()
        if name in out:
            raise AdapterError(f"--adapters: the name {name!r} is given twice")
        out[name] = path.strip()
    if not out:
        raise AdapterError("--adapters: give at least one NAME=DIR")
    return out


def read_adapter(path: str | pathlib.Path, base_cfg: ModelConfig, step: str | int = "last") -> tuple[dict, LoRAConfig]:
    """(adapter tree of lora_a / lora_b leaves, LoRAConfig) of a PEFT folder or a jaxtune LoRA run."""
    directory = pathlib.Path(path)
    if loading.adapter_kind(directory) == "peft":
        return peft_io.load_peft_adapter(directory, base_cfg)
    run = workdir_lib.read_run_config(directory)
    lora_cfg = workdir_lib.run_lora_config(run)
    if lora_cfg is None:
        raise AdapterError(f"{directory} is a full fine-tuning run (lora.enabled false), not an adapter: serve it "
                           f"as its own model (python -m jaxtune.generate --adapter={directory})")
    step_number = workdir_lib.resolve_step(directory, step)
    adapters, other = lora.split_trainable(workdir_lib.load_trained_params(directory, step_number), full_finetune=False)
    if jax.tree_util.tree_leaves(other):
        raise AdapterError(f"{directory} trained more than adapters (new token rows: data.add_tokens), which a shared "
                           f"base cannot hold: serve it alone (python -m jaxtune.generate --adapter={directory})")
    workdir_lib.check_fits(adapters, base_cfg.replace(lora=lora_cfg), f"checkpoint step {step_number} of {directory}",
                           complete=True)
    return params_lib.cast_tree(adapters, ADAPTER_DTYPE), lora_cfg


def union_targets(configs: Iterable[LoRAConfig]) -> tuple[str, ...]:
    """Targets adapted by any of the configs, in the model's order."""
    wanted = {target for cfg in configs for target in cfg.targets}
    return tuple(target for target in LINEAR_TARGETS if target in wanted) + tuple(sorted(wanted - set(LINEAR_TARGETS)))


class AdapterBank:
    """`capacity` adapter slots (slot 0 = the base) over the model of `cfg`, ranks up to `max_rank`,
    `columns` rank columns in all (default: every adapter slot at `max_rank`), for `targets` (linear
    targets). Not thread-safe: one owner (the CLI, or the serving engine)."""

    def __init__(self, cfg: ModelConfig, capacity: int, max_rank: int, targets: Sequence[str] = LINEAR_TARGETS,
                 columns: int | None = None):
        unsupported = sorted(set(targets) - set(LINEAR_TARGETS))
        if unsupported:
            raise AdapterError(f"multi-adapter batches adapt linear layers only ({', '.join(LINEAR_TARGETS)}); "
                               f"not {', '.join(unsupported)}: serve such an adapter alone (--adapter=DIR)")
        columns = (capacity - 1) * max_rank if columns is None else columns
        if capacity < 2 or max_rank < 1 or columns < 1 or not targets:
            raise AdapterError(f"an adapter bank needs capacity >= 2 (slot 0 is the base), max_rank >= 1, columns "
                               f">= 1 and a target; got capacity {capacity}, max_rank {max_rank}, columns {columns}, "
                               f"targets {tuple(targets)}")
        self.cfg, self.capacity, self.max_rank, self.columns = cfg, capacity, max_rank, columns
        self.targets = tuple(t for t in LINEAR_TARGETS if t in targets)
        self.slots: dict[str, int] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.paths: dict[str, str] = {}
        self.column_slots = np.full(columns, FREE_COLUMN, np.int32)  # the slot owning each column
        shapes = lora.adapter_shapes(cfg.replace(lora=LoRAConfig(rank=1, targets=self.targets)))
        self.stacks: dict[tuple[str, ...], dict[str, jax.Array]] = {}
        for target in self.targets:
            module = peft_io.adapter_module_path(target)
            a, b = (params_lib.get_leaf(shapes, module + (leaf,)).shape for leaf in ("lora_a", "lora_b"))
            self.stacks[module] = {BANK_A: jnp.zeros((a[0], a[1], columns), ADAPTER_DTYPE),  # [L, in, C]
                                   BANK_B: jnp.zeros((b[0], columns, b[2]), ADAPTER_DTYPE)}  # [L, C, out]

    @classmethod
    def from_dirs(cls, cfg: ModelConfig, dirs: Mapping[str, str | pathlib.Path], capacity: int | None = None,
                  max_rank: int | None = None, targets: Sequence[str] | None = None,
                  columns: int | None = None) -> "AdapterBank":
        """A bank holding the adapters of `dirs` ({name: dir}); by default just big enough for them."""
        loaded = {name: read_adapter(path, cfg) for name, path in dirs.items()}
        configs = [lora_cfg for _, lora_cfg in loaded.values()]
        bank = cls(cfg, capacity or len(loaded) + 1, max_rank or max((c.rank for c in configs), default=8),
                   targets or union_targets(configs) or LINEAR_TARGETS, columns or sum(c.rank for c in configs) or None)
        for name, (adapters, lora_cfg) in loaded.items():
            bank.add(name, adapters, lora_cfg, path=str(dirs[name]))
        return bank

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def check_fits(self, name: str, lora_cfg: LoRAConfig) -> None:
        """AdapterError unless an adapter `name` of `lora_cfg` can join: a new valid name, a free slot,
        rank <= max_rank, targets within the bank's."""
        if not NAME.match(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits and _ . : / - (not starting with a symbol)")
        if name in self.slots:
            raise AdapterError(f"an adapter named {name!r} is already loaded (unload it first)")
        if len(self.slots) >= self.capacity - 1:
            raise AdapterError(f"all {self.capacity - 1} adapter slots are taken ({', '.join(self.slots)}): unload one, "
                               f"or start with more slots (--max_loras)")
        if lora_cfg.rank > self.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {lora_cfg.rank}, above this bank's max rank {self.max_rank} "
                               f"(--max_lora_rank)")
        free = self.free_columns()
        if lora_cfg.rank > len(free):
            raise AdapterError(f"adapter {name!r} needs {lora_cfg.rank} rank columns but {len(free)} of this bank's "
                               f"{self.columns} are free (the loaded adapters' ranks take the rest): unload one, or "
                               f"start with more columns (--max_lora_columns)")
        extra = sorted(set(lora_cfg.targets) - set(self.targets))
        if extra:
            raise AdapterError(f"adapter {name!r} adapts {', '.join(extra)}, which this bank does not hold (it holds "
                               f"{', '.join(self.targets)}; embed_tokens / lm_head adapters cannot be batched)")

    def free_columns(self) -> np.ndarray:
        return np.flatnonzero(self.column_slots == FREE_COLUMN)

    def add(self, name: str, adapters: dict, lora_cfg: LoRAConfig, path: str = "") -> int:
        """Write an adapter (tree of lora_a [L, in, r] / lora_b [L, r, out]) into a free slot and the
        first r free columns -> the slot."""
        self.check_fits(name, lora_cfg)
        slot = min(set(range(1, self.capacity)) - set(self.slots.values()))
        columns_r = self.free_columns()[:lora_cfg.rank]
        for module, stack in self.stacks.items():
            if module[-1] not in lora_cfg.targets:
                continue  # its columns are zero there already (fresh, or zeroed by `remove`)
            a_LxIxr = np.asarray(params_lib.get_leaf(adapters, module + ("lora_a",)), np.float32)
            b_Lxrxo = np.asarray(params_lib.get_leaf(adapters, module + ("lora_b",)), np.float32) * lora_cfg.scaling
            stack[BANK_A] = stack[BANK_A].at[:, :, columns_r].set(a_LxIxr)
            stack[BANK_B] = stack[BANK_B].at[:, columns_r].set(b_Lxrxo)
        self.column_slots[columns_r] = slot
        self.slots[name], self.configs[name], self.paths[name] = slot, lora_cfg, path
        log.info("adapter %r -> slot %d (r=%d, targets %s)", name, slot, lora_cfg.rank, ",".join(lora_cfg.targets))
        return slot

    def remove(self, name: str) -> None:
        """Free an adapter's slot and columns (zeroed, so a later adapter starts from zeros)."""
        if name not in self.slots:
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {', '.join(self.slots) or 'none'})")
        slot = self.slots.pop(name)
        del self.configs[name], self.paths[name]
        columns_r = np.flatnonzero(self.column_slots == slot)
        for stack in self.stacks.values():
            stack[BANK_A] = stack[BANK_A].at[:, :, columns_r].set(0.0)
            stack[BANK_B] = stack[BANK_B].at[:, columns_r].set(0.0)
        self.column_slots[columns_r] = FREE_COLUMN

    def rows(self, names: Sequence[str | None]) -> np.ndarray:
        """The slot of each batch row ([B] int32): None (or '') = the base model."""
        unknown = sorted({n for n in names if n and n not in self.slots})
        if unknown:
            raise AdapterError(f"unknown adapter(s) {', '.join(map(repr, unknown))}: loaded are "
                               f"{', '.join(self.slots) or 'none'}")
        return np.asarray([self.slots[n] if n else BASE_SLOT for n in names], np.int32)

    def row_columns(self, rows_B: np.ndarray) -> np.ndarray:
        """[B, max_rank] int32: each row's columns in order, then `columns` (past the end: none)."""
        table_BxR = np.full((len(rows_B), self.max_rank), self.columns, np.int32)
        for b, slot in enumerate(np.asarray(rows_B).tolist()):
            own = np.flatnonzero(self.column_slots == slot) if slot != BASE_SLOT else ()
            table_BxR[b, :len(own)] = own
        return table_BxR

    def params(self, base_params: dict, rows_B: np.ndarray) -> dict:
        """`base_params` with the bank, the rows' slots, the columns' slots and each row's columns next to
        every target kernel (for Llama.apply)."""
        rows_B = np.asarray(rows_B, np.int32)
        num_layers = self.cfg.num_layers
        index_leaves = {ROWS: rows_B, COLUMNS: self.column_slots, ROW_COLUMNS: self.row_columns(rows_B)}
        per_layer = {leaf: jnp.asarray(np.broadcast_to(value, (num_layers, *value.shape)))
                     for leaf, value in index_leaves.items()}
        bank_tree: dict = {}
        for module, stack in self.stacks.items():
            for leaf, value in {**stack, **per_layer}.items():
                params_lib.set_leaf(bank_tree, module + (leaf,), value)
        return params_lib.merge_trees(base_params, bank_tree)
