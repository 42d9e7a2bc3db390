"""bolmo-async: a deterministic, resumable fraction of allenai/bolmo_mix as OLMo-core/bolmo-core token shards.

Python API (mirrors the CLI)::

    import bolmo_async
    bolmo_async.plan("out", data_fraction=0.001)
    bolmo_async.fetch("out", tokenizer="subword")
    bolmo_async.finalize("out")
    # or all three:
    bolmo_async.prepare("out", data_fraction=0.001, tokenizer="subword")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import BolmoError

if TYPE_CHECKING:
    from .api import fetch, finalize, inspect, plan, prepare

__version__ = "0.1.0"
__all__ = ["BolmoError", "__version__", "fetch", "finalize", "inspect", "plan", "prepare"]

_API = frozenset({"fetch", "finalize", "inspect", "plan", "prepare"})


def __getattr__(name: str) -> Any:
    # The API (and aiohttp, huggingface_hub behind it) is imported on first use: `import
    # bolmo_async` and `bolmo_async.tokenize` stay light (the exactness harness, inspection).
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'bolmo_async' has no attribute {name!r}")
