"""Tasks and their registry: one module per task, found by name.

Every module in this package that defines ``TASK`` (a :class:`Task`) is a task;
:func:`register` adds one from elsewhere (a plugin, a test). The API, the CLI
and the widgets take the task list and each task's behaviour from here.

Examples
--------
>>> from napari_hemato.tasks import get_task, task_names
>>> task_names()
('mitosis', 'nuclei', 'smear')
>>> get_task("smear").title
'Blood smear cells (RBC / WBC / platelets) and the WBC differential'
"""

from __future__ import annotations

import importlib
import pkgutil

from napari_hemato.core.errors import ModelError
from napari_hemato.tasks.base import Task

__all__ = ["Task", "get_task", "register", "suggest_task", "task_for", "task_names", "task_of",
           "unregister"]
#: the task the Analyse widget offers when no task :meth:`~Task.suits` an image
DEFAULT_TASK = "nuclei"

_TASKS: dict[str, Task] = {}
_found = False


def _discover() -> None:
    global _found
    if _found:
        return
    _found = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            _TASKS.setdefault(task.name, task)


def register(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (``replace`` to override one of the same name)."""
    _discover()
    if not isinstance(task, Task) or not task.name:
        raise TypeError("register() takes a Task instance with a name")
    if task.name in _TASKS and not replace and _TASKS[task.name] is not task:
        raise ValueError(f"a task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove a task added with :func:`register` (tests)."""
    _TASKS.pop(name, None)


def task_names() -> tuple[str, ...]:
    """Names of every registered task, sorted."""
    _discover()
    return tuple(sorted(_TASKS))


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (a :class:`Task` is returned as is)."""
    if isinstance(name, Task):
        return name
    _discover()
    try:
        return _TASKS[name]
    except KeyError:
        raise ModelError(f"unknown task {name!r}; choose one of {', '.join(task_names())}") from None


def task_for(annotations) -> Task:
    """The task an annotation set (a layer's objects) belongs to: from the model that made
    it, else the first task that :meth:`~Task.claims` it, else the generic task."""
    model = (annotations.metadata or {}).get("model") or {}
    if isinstance(model, dict) and model.get("task"):
        return task_of(model["task"])
    _discover()
    return next((t for t in _TASKS.values() if t.claims(annotations)), Task())


def task_of(model_task: str | None) -> Task:
    """The task whose models carry ``model_task`` in their spec (the generic task if none)."""
    _discover()
    for task in _TASKS.values():
        if (task.model_task or task.name) == model_task:
            return task
    return Task()


def suggest_task(info: dict) -> str:
    """The task to offer for an image described by ``info`` (a slide's
    :meth:`~napari_hemato.core.slide.Slide.info`): the first task that
    :meth:`~Task.suits` it, else :data:`DEFAULT_TASK`.

    Examples
    --------
    >>> suggest_task({"path": "field.jpg", "mpp": None, "levels": [{}], "channels": 3})
    'smear'
    >>> suggest_task({"path": "slide.svs", "mpp": 0.25, "levels": [{}, {}], "channels": 3})
    'nuclei'
    """
    _discover()
    return next((name for name in task_names() if _TASKS[name].suits(info)), DEFAULT_TASK)
