"""jaxtune: fine-tune Hugging Face LLMs in JAX/Flax with LoRA or all parameters.

Entry points: `python -m jaxtune.train`, `jaxtune.generate`, `jaxtune.evaluate`, `jaxtune.export`;
the notebook API is `jaxtune.api` (load, logits, generate_text).
"""

import logging
import sys


def setup_logging() -> None:
    """For the CLIs: jaxtune's messages at INFO; JAX, orbax and absl (which log every file) at WARNING.

    One stderr handler on the root logger takes the place of absl's; other handlers (pytest's
    caplog, a user's) stay, and records still propagate to them.
    """
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers
                        if not isinstance(h, absl_logging.ABSLHandler) and not getattr(h, "jaxtune", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.jaxtune = True
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("jaxtune").setLevel(logging.INFO)
