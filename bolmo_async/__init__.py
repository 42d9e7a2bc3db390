"""bolmo-async: a deterministic, resumable fraction of allenai/bolmo_mix as OLMo-core/bolmo-core token shards.

Python API (mirrors the CLI)::

    import bolmo_async
    bolmo_async.plan("out", data_fraction=0.001)
    bolmo_async.fetch("out", tokenizer="subword")
    bolmo_async.finalize("out")
    # or all three:
    bolmo_async.prepare("out", data_fraction=0.001, tokenizer="subword")
"""

# Eager on purpose: the functions must shadow the submodules of the same names (plan.py, fetch.py, ...).
from .api import fetch, finalize, inspect, plan, prepare
from .errors import BolmoError

__version__ = "0.1.0"
__all__ = ["BolmoError", "__version__", "fetch", "finalize", "inspect", "plan", "prepare"]
