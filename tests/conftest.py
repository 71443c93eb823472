from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from tests.synth import TinyConfig, write_tiny_llama


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama models, one per weight type the issue names, plus an untied-output variant."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for q in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.F32):
        out[q.name] = write_tiny_llama(d / f"tiny-{q.name}.gguf", TinyConfig(qtype=q), seed=1)
    out["untied"] = write_tiny_llama(
        d / "tiny-untied.gguf", TinyConfig(qtype=Q.Q8_0, tied=False), seed=2
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["Q8_0"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Tests never write into the user's cache unless they ask for the real model."""
    import os

    if "WORKBENCH_HOME" not in os.environ:
        monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path_factory.getbasetemp() / "home"))
