"""A GGUF file running in llama.cpp (llama-cpp-python) in a child process (`moesift.engines.llamacpp_worker`):
tokenization with the file's own tokenizer, routing of a prompt and its greedy continuation, negative
log-likelihood of a window, prefill and decode timings. `{arch}.expert_used_count` can be overridden at load
(llama.cpp's own key-value override): the model then selects that many experts per token."""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import MoesiftError
from ..formats.gguf import GGUFIndex
from .choose import require
from .llamacpp_child import LlamaChild

WORKER = Path(__file__).with_name("llamacpp_worker.py")


def llama_cpp_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "?"


class GGUFSession:
    """`index` (a GGUF model) loaded in llama.cpp with a context of `n_ctx` tokens. `route`: read the routing of
    the MoE layers (the graph evaluation callback); `top_k`: experts per token instead of the file's."""

    def __init__(self, index: GGUFIndex, work_dir: Path, n_ctx: int, route: bool = False,
                 top_k: int | None = None) -> None:
        require("llama.cpp")
        self.index, self.work, self.n = index, work_dir, 0
        spec = index.spec
        k = int(top_k or spec.top_k)
        cfg: dict[str, Any] = {"path": str(index.directory), "n_ctx": int(n_ctx), "k": k,
                               "layers": list(spec.moe_layers) if route else [],
                               "overrides": {index.key("expert_used_count"): k} if top_k else {}}
        self.name = f"llama.cpp (llama-cpp-python {llama_cpp_version()})"
        self.child = LlamaChild([str(WORKER), json.dumps(cfg)], work_dir / f"llama-{os.getpid()}-{id(self)}.stderr",
                                repr(str(index.directory)))
        msg = self.child.read()
        if "error" in msg:
            self.close()
            raise MoesiftError(f"llama.cpp cannot load {str(index.directory)!r}: {msg['error']}")
        self.n_vocab = int(msg["n_vocab"])

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        self.child.send(req)
        ans = self.child.read()
        if "error" in ans:
            raise MoesiftError(f"llama.cpp failed on {str(self.index.directory)!r}: {ans['error']}")
        return ans

    def tokenize(self, texts: list[str], special: bool = True) -> list[list[int]]:
        return self.ask({"op": "tokenize", "texts": texts, "special": special})["ids"]

    def route(self, ids: list[int], generate: int = 0, eos: list[int] | None = None) -> dict[str, Any]:
        """Routing of every token fed (the prompt, then the generated tokens fed back): ``ids`` int [T, L, K]
        (by descending selection score), ``weights`` float32 [T, L, K] and ``logits`` float32 [T, L, E] when
        llama.cpp's graph has them; ``prompt`` (tokens of the prompt) and ``generated`` (the greedy tokens)."""
        self.n += 1
        out = self.work / f"route-{os.getpid()}-{self.n}.npz"
        ans = self.ask({"op": "route", "ids": list(map(int, ids)), "generate": int(generate), "eos": eos,
                        "out": str(out)})
        with np.load(out) as z:
            arrays = {k: z[k] for k in z.files}
        out.unlink()
        return {**arrays, "prompt": int(ans["prompt"]), "generated": list(ans["generated"])}

    def nll(self, ids: list[int]) -> dict[str, Any]:
        return self.ask({"op": "nll", "ids": list(map(int, ids))})

    def speed(self, ids: list[int], n: int) -> dict[str, Any]:
        return self.ask({"op": "speed", "ids": list(map(int, ids)), "n": int(n)})

    def __enter__(self) -> GGUFSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.child.close()


class GGUFTokenizer:
    """The GGUF file's own tokenizer (llama.cpp's), with the calls moesift's workload readers make of a
    transformers tokenizer: ``tok(text)["input_ids"]`` (special tokens such as BOS added as the file says),
    truncation to ``max_length``. Chats are refused: llama.cpp's chat templates are not applied here."""

    chat_template = None
    pad_token_id = None

    def __init__(self, session: GGUFSession) -> None:
        self.session = session

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None) -> dict[str, list[int]]:
        ids = self.session.tokenize([text], special=add_special_tokens)[0]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise MoesiftError("chat workloads ('messages') need a chat template: pass --hf-model with the transformers "
                           "checkpoint the GGUF file was converted from, or use a 'text' field")
