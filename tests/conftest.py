from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads; on a busy 2-core machine the thread barriers cost 2-3x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# 15 real routing traces (5 public models x 3 workloads) in the WCER `expert-trace/1` JSON format.
WCER_DIR = Path(os.environ.get("MOESIFT_WCER_DIR", Path(__file__).parent / "data" / "wcer"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(model_type) -> directory of a saved tiny random model (built once per session), its
    config.json with the key names of the family's hub checkpoints."""
    from tiny import save

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            d = root / model_type
            save(model_type, d)
            cache[model_type] = d
        return cache[model_type]

    return get


@pytest.fixture(scope="module")
def llama():
    """Skips a test without llama-cpp-python and gguf-py (moesift[gguf])."""
    pytest.importorskip("llama_cpp", reason="needs moesift[gguf] (llama-cpp-python)")
    pytest.importorskip("gguf", reason="needs moesift[gguf]")
