"""jaxtune.errors: every error class jaxtune defines is a JaxtuneError (what the CLIs catch), and keeps the
built-in base that callers caught before there was one base."""

import importlib
import inspect
import pkgutil

import pytest

import jaxtune
from jaxtune.errors import JaxtuneError

# Errors that never reach a user: raised and caught inside the task scorers (a model's answer that
# does not parse or whose SQL cannot run is scored as wrong).
# jaxtune.serve.ApiError is an HTTP request's error: the server answers it to the client as OpenAI's JSON
# error body with its status and keeps serving; it never reaches a CLI.
INTERNAL = {"jaxtune.tasks.sql.QueryError", "jaxtune.tasks.viggo.MRError", "jaxtune.serve.ApiError"}

# The built-in base each user-facing error had before JaxtuneError: `except ValueError` etc. still catch it.
BUILT_IN_BASES = {
    "jaxtune.checkpoint.disk.CheckpointError": OSError,
    "jaxtune.config.ConfigError": ValueError,
    "jaxtune.data.sources.DataError": ValueError,
    "jaxtune.errors.MissingPackageError": ImportError,
    "jaxtune.distributed.LaunchError": RuntimeError,
    "jaxtune.hf.ExportError": ValueError,
    "jaxtune.hf.ModelError": ValueError,
    "jaxtune.hf.WeightsError": ValueError,
    "jaxtune.loading.InferenceError": ValueError,
    "jaxtune.sharding.ShardingError": ValueError,
    "jaxtune.smollm2.SourceUnavailableError": RuntimeError,
    "jaxtune.tasks.registry.UnknownTaskError": KeyError,
    "jaxtune.tasks.common.TaskError": ValueError,
    "jaxtune.tasks.public.PublicDatasetError": RuntimeError,
    "jaxtune.train.TrainingError": RuntimeError,
    "jaxtune.plan.targets.PlanError": ValueError,
    "jaxtune.multi_adapter.AdapterError": ValueError,
    "jaxtune.generate.PromptsError": ValueError,
    "jaxtune.compare.run.ArmFailed": RuntimeError,
    "jaxtune.compare.arms.CompareConfigError": ValueError,
    # The serving engine's refusals (answered as HTTP 429 / 503 by jaxtune.serve): new, no older base.
    "jaxtune.engine.QueueFull": Exception,
    "jaxtune.engine.EngineStopped": Exception,
}


def error_classes() -> dict[str, type]:
    """'module.Class' -> class, for every exception class defined in any jaxtune module."""
    found = {}
    for info in pkgutil.walk_packages(jaxtune.__path__, prefix="jaxtune."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[f"{info.name}.{name}"] = value
    return found


def test_every_error_class_is_a_jaxtune_error():
    found = error_classes()
    assert set(BUILT_IN_BASES) | INTERNAL <= set(found), "the walk must see every module"
    user_facing = {name: cls for name, cls in found.items() if name not in INTERNAL}
    not_based = [name for name, cls in user_facing.items() if not issubclass(cls, JaxtuneError)]
    assert not not_based, (f"{not_based} do not derive from jaxtune.errors.JaxtuneError, so the CLIs would "
                           f"print a traceback for them; derive them from it (or list them in INTERNAL, saying why)")
    assert set(user_facing) - {"jaxtune.errors.JaxtuneError"} == set(BUILT_IN_BASES), \
        "a new error class: add it to BUILT_IN_BASES with the built-in base it keeps"


@pytest.mark.parametrize("name", sorted(BUILT_IN_BASES))
def test_error_classes_keep_their_built_in_base(name):
    cls = error_classes()[name]
    assert issubclass(cls, BUILT_IN_BASES[name]) and issubclass(cls, JaxtuneError)


def test_unknown_task_message_is_plain_and_still_a_key_error():
    from jaxtune import tasks

    with pytest.raises(KeyError) as info:
        tasks.get("nope")
    assert isinstance(info.value, JaxtuneError)
    assert str(info.value) == f"unknown task 'nope'; known tasks: {', '.join(tasks.NAMES)}"
