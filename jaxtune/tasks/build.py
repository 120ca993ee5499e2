"""Command line for the bundled JSONL splits: `python -m jaxtune.tasks.build [--out DIR]`.

Owns the CLI only; the files are written by `jaxtune.tasks.write_split_files`. The shipped files
under `jaxtune/tasks/data/<task>/` are this command's output with the default sizes and seed 0.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from jaxtune.errors import JaxtuneError
from jaxtune.tasks import registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(registry.DATA_DIR),
                        help="root folder; each task goes to <out>/<task>/")
    parser.add_argument("--seed", type=int, default=registry.DEFAULT_SEED)
    parser.add_argument("--tasks", nargs="*", default=list(registry.NAMES))
    args = parser.parse_args(argv)
    for task in args.tasks:
        try:
            paths = registry.write_split_files(task, pathlib.Path(args.out) / task, seed=args.seed)
        except JaxtuneError as e:  # the user can fix it: one message, no traceback
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        for split, path in paths.items():
            print(f"{task:>10} {split:<10} {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
