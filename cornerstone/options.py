"""The Python API's keyword arguments as a step's settings model (one rule for every step).

Kept apart from :mod:`cornerstone.settings` so that a step's module can read its keyword arguments
without importing every other step's settings (the planner would otherwise import the export settings,
which import the repair that reads plans).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def with_options(settings: BaseModel | None, model: type[BaseModel], options: dict[str, Any],
                 nested: dict[str, str] | None = None, *, function: str) -> Any:
    """``settings`` (or ``model``'s defaults) with ``options`` set: the API's keyword arguments, each a
    field of ``model`` or, for the names in ``nested`` (``{"limit": "tasks"}``), of that sub-model.
    An unknown keyword is a TypeError, as Python's own."""
    # a recipe's section may add fields of its own (where its output goes): only the step's are settings
    data = ({key: value for key, value in settings.model_dump(exclude_unset=True).items() if key in model.model_fields}
            if settings is not None else {})
    for name, value in options.items():
        parent = (nested or {}).get(name)
        if parent is not None:
            data[parent] = {**data.get(parent, {}), name: value}
        elif name in model.model_fields:
            data[name] = value
        else:
            raise TypeError(f"{function}() got an unexpected keyword argument '{name}'")
    return model.model_validate(data)
