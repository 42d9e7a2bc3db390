"""A Hub-compatible mirror (loopback HTTP server) and the generated sample mix.

The mirror speaks the part of the Hugging Face Hub API that huggingface_hub and our fetcher
use, so tests and the demo exercise the real client code with no internet.
"""

from .faults import FaultConfig
from .sample import build_sample
from .server import Mirror, MirrorRepo, MirrorThread, WanConfig, run_mirror

__all__ = ["FaultConfig", "Mirror", "MirrorRepo", "MirrorThread", "WanConfig", "build_sample", "run_mirror"]
