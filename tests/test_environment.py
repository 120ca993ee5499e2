"""What a user's terminal shows on a machine with the base install only (no torch): jaxtune's messages.

The CLIs run in subprocesses whose `sitecustomize` hides packages the base install does not have
(`sys.modules[name] = None`: `import` raises ModuleNotFoundError and `importlib.util.find_spec`
finds nothing, which is how transformers decides that torch or jinja2 is absent). Hiding torch
makes transformers print its "PyTorch was not found" advice at import, and restoring a checkpoint
makes orbax log "Metadata file does not exist" through absl: neither may reach the user unless
JAXTUNE_LOG=debug asks for other libraries' warnings. A missing jinja2 (what `make demo` hit before
it was declared) is one clear error naming the package and the install command.
"""

import os
import pathlib
import sys

from conftest import write_chat_jsonl
from test_cli import assert_ok, assert_one_clear_error, run_cli, train_command

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
THIRD_PARTY_NOISE = ["PyTorch was not found", "Metadata file does not exist"]


def environment(tmp_path: pathlib.Path, hidden: list[str], **extra: str) -> dict:
    """os.environ for a one-CPU-device CLI run in which the packages `hidden` are not installed."""
    shim = tmp_path / "hide_packages"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in hidden))
    env = {key: value for key, value in os.environ.items()
           if key not in ("JAXTUNE_LOG", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{shim}{os.pathsep}{REPO_ROOT}", **extra)
    return env


def generate_command(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "jaxtune.generate", f"--adapter={workdir}", "--prompt=Name color number 1.",
            "--max_new_tokens=4"]


def test_a_missing_jinja2_is_one_clear_error_naming_it_not_the_data(tiny_chat_model, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=4)
    env = environment(tmp_path, hidden=["torch", "jinja2"])
    result = run_cli(train_command(tiny_chat_model, data, tmp_path / "run"), env)
    assert_one_clear_error(result, "'jinja2' is not installed", "pip install -e .", "pip install jinja2")
    assert str(data) not in result.stderr and "cannot render" not in result.stderr


def test_train_and_generate_print_no_third_party_noise_unless_debug(tiny_chat_model, tmp_path):
    env = environment(tmp_path, hidden=["torch"])
    workdir = tmp_path / "run"
    trained = run_cli(train_command(tiny_chat_model, write_chat_jsonl(tmp_path / "train.jsonl", n=8), workdir,
                                    "--config.train.steps=1", "--config.train.batch_size=4"), env)
    assert_ok(trained)
    generated = run_cli(generate_command(workdir), env)
    assert_ok(generated)
    for result in (trained, generated):
        for noise in THIRD_PARTY_NOISE:
            assert noise not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "loaded step 1 of" in generated.stderr  # jaxtune's own messages still come through

    debug = run_cli(generate_command(workdir), environment(tmp_path, hidden=["torch"], JAXTUNE_LOG="debug"))
    assert_ok(debug)
    for noise in THIRD_PARTY_NOISE:  # hidden above, not gone: the check above can fail
        assert noise in debug.stderr, debug.stderr[-3000:]


def test_a_bad_jaxtune_log_value_is_one_clear_error(tmp_path):
    result = run_cli(generate_command(tmp_path / "no_run"), environment(tmp_path, hidden=[], JAXTUNE_LOG="loud"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "JAXTUNE_LOG='loud'" in result.stderr and "debug, info, warning, error" in result.stderr



def test_command_modules_log_under_the_jaxtune_logger():
    """`python -m jaxtune.X` runs module X as "__main__": a logger named by __name__ would sit outside
    "jaxtune" (whose level setup_logging sets) and its info lines ("resumed from checkpoint step N",
    "exporting step N ...") would vanish. Every module with a command line names its logger."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "jaxtune").rglob("*.py")):
        source = path.read_text()
        if '__name__ == "__main__"' not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "getLogger" and node.args
                    and not (isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("jaxtune"))):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"name these loggers 'jaxtune.<module>', not __name__: {offenders}"
