"""`load`: a GGUF file or known model name -> spec, tokenizer, chat template, mapped weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workbench import store
from workbench.gguf.chat import ChatTemplate
from workbench.gguf.reader import GGUFModel, ModelSpec, read_gguf
from workbench.gguf.tokenizer import Tokenizer


@dataclass
class Model:
    path: Path
    gguf: GGUFModel  # metadata and memory-mapped tensors
    spec: ModelSpec
    tokenizer: Tokenizer
    chat_template: ChatTemplate

    @property
    def name(self) -> str:
        return self.spec.name


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    home: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Model:
    """Open a GGUF model: a path, or a known short name (pulled into the cache when missing).

    ``home`` is the workbench cache directory (default: `store.default_home`); ``progress``
    receives (bytes done, bytes total) while a missing model is pulled.
    """
    home = home if home is not None else store.default_home()
    path = store.resolve(model, home, progress=progress)
    g = read_gguf(path)
    assert g.spec is not None
    return Model(
        path=path,
        gguf=g,
        spec=g.spec,
        tokenizer=Tokenizer.from_metadata(g.metadata),
        chat_template=ChatTemplate.from_metadata(g.metadata),
    )
