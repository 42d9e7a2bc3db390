"""bolmo-async: a deterministic, resumable fraction of allenai/bolmo_mix as OLMo-core/bolmo-core token shards.

Python API (mirrors the CLI: keywords are the flags, ``--data-fraction`` -> ``data_fraction``)::

    import bolmo_async
    bolmo_async.plan("out", data_fraction=0.001, include=["data/stack_edu/*"])
    bolmo_async.fetch("out", tokenizer="subword")
    bolmo_async.finalize("out")
    # or all three:
    bolmo_async.prepare("out", data_fraction=0.001, tokenizer="subword")
    report = bolmo_async.inspect("out", decode=2)

``plan``, ``fetch``, ``finalize``, ``prepare`` and ``inspect`` raise ``BolmoError`` (one line
naming the fix; a stop, Ctrl+C, is a ``KeyboardInterrupt`` saying what is kept); ``Selection`` is what ``plan`` / ``prepare`` take as ``selection=`` (or as the
keywords ``include``, ``exclude``, ``source_depth``, ``source_fractions``, ``text_field``,
``id_field``). From a script, call them under ``if __name__ == "__main__":`` (worker processes
import the script), or pass ``processes=1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import BolmoError

if TYPE_CHECKING:
    from .api import fetch, finalize, inspect, plan, prepare
    from .models import Selection

__version__ = "0.1.0"
__all__ = ["BolmoError", "Selection", "__version__", "fetch", "finalize", "inspect", "plan", "prepare"]

_API = frozenset({"fetch", "finalize", "inspect", "plan", "prepare"})


def __getattr__(name: str) -> Any:
    # The API (and aiohttp, huggingface_hub behind it) is imported on first use: `import
    # bolmo_async` and `bolmo_async.tokenize` stay light (the exactness harness, inspection).
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "Selection":
        from .models import Selection

        return Selection
    raise AttributeError(f"module 'bolmo_async' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
