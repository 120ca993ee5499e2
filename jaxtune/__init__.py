"""jaxtune: fine-tune Hugging Face LLMs in JAX/Flax with LoRA or all parameters.

Entry points: `python -m jaxtune.train`, `jaxtune.generate`, `jaxtune.evaluate`, `jaxtune.export`;
the notebook API is `jaxtune.api` (load, logits, generate_text).

This module owns what the CLIs print besides their results: `setup_logging` (jaxtune's messages,
other libraries' warnings only at JAXTUNE_LOG=debug) and `MissingPackageError` (a package that is
not installed, named with the command that installs it).
"""

import logging
import os
import sys

LOG_LEVEL_ENV = "JAXTUNE_LOG"  # debug | info (default) | warning | error
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
from jaxtune.errors import MissingPackageError  # noqa: E402,F401  (re-exported: jaxtune.MissingPackageError)


def log_level() -> int:
    """jaxtune's log level from $JAXTUNE_LOG (default info); a bad value is one clear error."""
    name = os.environ.get(LOG_LEVEL_ENV, "info").strip().lower() or "info"
    if name not in LOG_LEVELS:
        raise SystemExit(f"error: {LOG_LEVEL_ENV}={os.environ[LOG_LEVEL_ENV]!r}: use one of {', '.join(LOG_LEVELS)}")
    return LOG_LEVELS[name]


def third_party_level(jaxtune_level: int) -> int:
    """Other libraries' level: their warnings are noise in a CLI's output, shown only at debug."""
    return logging.WARNING if jaxtune_level <= logging.DEBUG else logging.ERROR


def quiet_third_party_imports(jaxtune_level: int) -> None:
    """Before transformers is imported: it logs advice at import time ("PyTorch was not found ...")
    from a logger whose level it sets from $TRANSFORMERS_VERBOSITY. A value already set wins."""
    if os.environ.get("TRANSFORMERS_VERBOSITY"):
        return
    level = third_party_level(jaxtune_level)
    os.environ["TRANSFORMERS_VERBOSITY"] = logging.getLevelName(level).lower()
    if "transformers" in sys.modules:  # imported already: set its logger directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(level)


def setup_logging() -> None:
    """For the CLIs: jaxtune's messages at $JAXTUNE_LOG (default INFO) on stderr; orbax, absl,
    transformers and the rest (which log every file, and advice that does not apply to jaxtune) at
    ERROR, or at WARNING when JAXTUNE_LOG=debug. JAX stays at WARNING: its warnings are about the
    hardware the run gets (a GPU present but a CPU-only jaxlib installed, ...).

    One stderr handler on the root logger takes the place of absl's; other handlers (pytest's
    caplog, a user's) stay, and records still propagate to them.
    """
    from absl import logging as absl_logging

    level = log_level()
    others = third_party_level(level)
    quiet_third_party_imports(level)
    absl_logging.set_verbosity(absl_logging.converter.standard_to_absl(others))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers
                        if not isinstance(h, absl_logging.ABSLHandler) and not getattr(h, "jaxtune", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.jaxtune = True
    root.addHandler(handler)
    root.setLevel(others)
    if logging.getLogger("jax").level == logging.NOTSET:  # JAX_LOGGING_LEVEL, if set, wins
        logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("jaxtune").setLevel(level)


def _started_as_cli() -> bool:
    """True while `python -m jaxtune.<module>` imports this package (sys.argv[0] is then '-m')."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = getattr(sys, "orig_argv", [])
    return any(flag == "-m" and module.startswith("jaxtune.") for flag, module in zip(argv, argv[1:]))


if _started_as_cli():  # before the CLI module's own imports reach transformers
    try:
        quiet_third_party_imports(log_level())
    except SystemExit:  # a bad $JAXTUNE_LOG: setup_logging() reports it
        pass
