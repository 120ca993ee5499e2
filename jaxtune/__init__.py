"""jaxtune: fine-tune Hugging Face LLMs in JAX/Flax with LoRA or all parameters.

Entry points: `python -m jaxtune.train`, `jaxtune.generate`, `jaxtune.evaluate`, `jaxtune.export`;
the notebook API is `jaxtune.api` (load, logits, generate_text).
"""

import logging
import sys


def setup_logging() -> None:
    """For the CLIs: jaxtune's messages at INFO; JAX, orbax and absl (which log every file) at WARNING.

    One stderr handler on the root logger replaces absl's, so records still propagate (pytest's
    caplog and users' handlers keep working).
    """
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("jaxtune").setLevel(logging.INFO)
