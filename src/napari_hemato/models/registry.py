"""Models shipped inside the package, one folder per task under ``bundled/``."""

from __future__ import annotations

from pathlib import Path

from napari_hemato.core.errors import ModelError

BUNDLED = Path(__file__).parent / "bundled"


def bundled_models() -> dict[str, Path]:
    """Task -> model folder for every bundled model that has a spec."""
    if not BUNDLED.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED.iterdir()) if (p / "model.json").is_file()}


def resolve_model(task: str, model: str | Path | None = None) -> Path:
    """The model folder to use: ``model`` if given, else the bundled one for ``task``."""
    if model is not None:
        path = Path(model)
        if not path.exists():
            raise ModelError(f"{path}: model folder not found")
        return path
    models = bundled_models()
    if task not in models:
        have = ", ".join(models) or "none"
        raise ModelError(
            f"no bundled model for task {task!r} (bundled: {have}); pass a model folder with --model"
        )
    return models[task]
