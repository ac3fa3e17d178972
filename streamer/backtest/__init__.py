"""Backtest reports: accuracy metrics, stateful versus window divergence, plots and HTML.

The names below load on first use, so that modules which import only a submodule, such as the Kafka service
importing ``streamer.backtest.file_replay``, do not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Divergence": "divergence", "divergence": "divergence", "ReportPaths": "report", "analyze": "report",
            "format_summary": "report", "write_report": "report"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    # Importing the submodule ``divergence`` binds the package attribute of that name to the module. The
    # function of the same name replaces it here, as the names above promise.
    globals()[name] = value
    return value
