"""The child process that runs a GGUF file in llama.cpp through llama-cpp-python's low-level API (run as a
script by `moesift.engines.llamacpp_session`; llama.cpp aborts the whole process on a failed internal check,
so it never runs inside the caller). One JSON request per line on stdin, one JSON answer per line on stdout.

Routing is read with llama.cpp's graph evaluation callback (`cb_eval` of the context): in its "ask" phase the
callback claims only the tensors build_moe_ffn (src/llama-graph.cpp) names, per decoder block N,
``ffn_moe_argsort-N`` (every expert by descending selection score, [n_expert, n_tokens] int32; the first
`expert_used_count` are the selected ones), ``ffn_moe_weights-N`` / ``ffn_moe_weights_softmax-N`` /
``ffn_moe_weights_norm-N`` / ``ffn_moe_weights_scaled-N`` (the routing weights: the last one of them the graph
computes, the weights the experts' outputs are multiplied by) and
``ffn_moe_logits-N`` / ``ffn_moe_logits_biased-N`` (router logits), and copies each with
ggml_backend_tensor_get once computed. Every token's output is requested, so the last block (which llama.cpp
otherwise runs on the output tokens only) routes every token. The KV cache is float32."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import numpy as np

SELECTION = b"ffn_moe_argsort"
WEIGHTS = (b"ffn_moe_weights", b"ffn_moe_weights_softmax", b"ffn_moe_weights_norm", b"ffn_moe_weights_scaled")
LOGITS = (b"ffn_moe_logits", b"ffn_moe_logits_biased")
WANTED = {SELECTION, *WEIGHTS, *LOGITS}
GGML_F32, GGML_I32 = 0, 26
ERROR_LEVEL = 4


class _TensorHead(ctypes.Structure):
    """The leading fields of ggml's `struct ggml_tensor` (ggml.h)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


class Capture:
    """The evaluation callback and what it copied during one llama_decode."""

    def __init__(self, lib: ctypes.CDLL, llama_cpp: object, layers: list[int], k: int) -> None:
        self.get = lib.ggml_backend_tensor_get
        self.get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.get.restype = None
        self.name = lib.ggml_get_name
        self.name.argtypes = [ctypes.c_void_p]
        self.name.restype = ctypes.c_char_p
        self.index = {layer: m for m, layer in enumerate(layers)}
        self.k = k
        self.on = False
        self.error: str | None = None
        self.cur: dict[tuple[str, int], np.ndarray] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._call)

    def _call(self, t: int, ask: bool, _user: int) -> bool:
        if not self.on:
            return not ask
        try:
            name = self.name(t) or b""
            if not name.startswith(b"ffn_moe_"):
                return not ask
            base, _, block = name.rpartition(b"-")
            if base not in WANTED or not block.isdigit() or int(block) not in self.index:
                return not ask
            if not ask:
                self._read(t, base, self.index[int(block)])
            return True
        except Exception as e:  # an exception must not cross into C (its return value would stop the graph)
            self.error = f"{type(e).__name__}: {e}"
            return not ask

    def _read(self, t: int, base: bytes, m: int) -> None:
        head = ctypes.cast(t, ctypes.POINTER(_TensorHead)).contents
        ne = [int(x) for x in head.ne]
        if head.type not in (GGML_F32, GGML_I32):
            raise ValueError(f"{base.decode()} has ggml type {head.type}")
        elem = 4
        if int(head.nb[1]) != ne[0] * elem or int(head.nb[2]) != ne[0] * ne[1] * elem:
            raise ValueError(f"{base.decode()} is not contiguous")
        n = ne[0] * ne[1] * ne[2] * ne[3]
        buf = np.empty(n, dtype=np.int32 if head.type == GGML_I32 else np.float32)
        self.get(t, buf.ctypes.data, 0, n * elem)
        if base == SELECTION:
            self.cur[("ids", m)] = buf.reshape(-1, ne[0])[:, : self.k].copy()
        elif base in WEIGHTS:
            self.cur[("weights", m)] = buf.reshape(-1, self.k)  # later names overwrite (normalised last)
        else:
            self.cur[("logits", m)] = buf.reshape(-1, ne[0])

    def take(self, n_layers: int) -> dict[str, np.ndarray]:
        """[T, L, K] ids and weights and [T, L, E] logits of the decode since the last call."""
        if self.error:
            raise RuntimeError(f"reading llama.cpp's routing tensors failed: {self.error}")
        cur, self.cur = self.cur, {}
        out = {}
        for kind in ("ids", "weights", "logits"):
            parts = [cur.get((kind, m)) for m in range(n_layers)]
            if all(p is not None for p in parts):
                out[kind] = np.stack(parts, axis=1)
            elif kind == "ids":
                missing = [m for m, p in enumerate(parts) if p is None]
                raise RuntimeError(f"llama.cpp's graph named no ffn_moe_argsort tensor for MoE layers {missing[:4]}")
        return out


class Session:
    """One GGUF model and context in llama.cpp."""

    def __init__(self, cfg: dict) -> None:
        import llama_cpp
        from llama_cpp import _ggml

        self.ll = llama_cpp
        self.errors: list[str] = []
        self._log = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._log, None)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        overrides = cfg.get("overrides") or {}
        if overrides:
            self._kv = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
            for i, (key, v) in enumerate(overrides.items()):
                self._kv[i].key = key.encode()
                self._kv[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                self._kv[i].value.val_i64 = int(v)
            self._kv[len(overrides)].key = b"\0"
            mp.kv_overrides = self._kv
        self.model = llama_cpp.llama_model_load_from_file(cfg["path"].encode(), mp)
        if not self.model:
            raise RuntimeError("; ".join(self.errors[-2:]) or "llama.cpp could not load the model")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = int(cfg["n_ctx"])
        layers = list(cfg.get("layers") or [])
        self.n_layers = len(layers)
        self.capture = Capture(_ggml.libggml, llama_cpp, layers, int(cfg.get("k") or 1)) if layers else None
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
        threads = int(cfg.get("threads") or max(1, min(4, os.cpu_count() or 1)))
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        if self.capture is not None:
            cp.cb_eval = self.capture.callback
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("; ".join(self.errors[-2:]) or "llama.cpp could not create a context")
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)

    def _on_log(self, level: int, text: bytes, _user: int) -> None:
        if level == ERROR_LEVEL:
            self.errors.append(text.decode(errors="replace").strip())

    def tokenize(self, text: str, special: bool) -> list[int]:
        b = text.encode()
        cap = len(b) + 8
        buf = (self.ll.llama_token * cap)()
        n = self.ll.llama_tokenize(self.vocab, b, len(b), buf, cap, special, False)
        if n < 0:
            cap = -n
            buf = (self.ll.llama_token * cap)()
            n = self.ll.llama_tokenize(self.vocab, b, len(b), buf, cap, special, False)
        return [int(x) for x in buf[:n]]

    def decode(self, ids: list[int], pos: int, all_logits: bool) -> np.ndarray | None:
        """Feed `ids` at positions pos.. of sequence 0; the logits of every token ([T, V]) when `all_logits`,
        else None (only the last token's are computed)."""
        b, n = self.batch, len(ids)
        if pos + n > self.n_ctx:
            raise RuntimeError(f"{pos + n} tokens exceed the context of {self.n_ctx}")
        b.n_tokens = n
        for i, tok in enumerate(ids):
            b.token[i] = int(tok)
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if all_logits or i == n - 1 else 0
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}: {'; '.join(self.errors[-2:])}")
        if not all_logits:
            return None
        ptr = self.ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab)).copy()

    def last_argmax(self) -> int:
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def is_eog(self, tok: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, tok))


def route(s: Session, req: dict) -> dict:
    """The routing of a prompt and of `generate` greedy tokens (each fed back but the last; none after an
    end-of-sequence token: one of req["eos"], else llama.cpp's end-of-generation tokens) saved to req["out"] (.npz: ids, weights, logits [T, L, *], one row per token fed)."""
    ids, n_new, eos = list(req["ids"]), int(req.get("generate") or 0), req.get("eos")
    s.reset()
    s.capture.on = True
    try:
        s.decode(ids, 0, True)
        parts = [s.capture.take(s.n_layers)]
        tok = s.last_argmax()
        generated = [tok] if n_new else []
        pos = len(ids)
        for _ in range(n_new - 1):
            if (tok in eos) if eos is not None else s.is_eog(tok):
                break
            s.decode([tok], pos, True)
            pos += 1
            parts.append(s.capture.take(s.n_layers))
            tok = s.last_argmax()
            generated.append(tok)
    finally:
        s.capture.on = False
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}
    np.savez(req["out"], **arrays)
    return {"prompt": len(ids), "fed": pos, "generated": generated}


def nll(s: Session, req: dict) -> dict:
    """Sum of next-token negative log-likelihoods of a window (position t predicts token t + 1)."""
    ids = list(req["ids"])
    s.reset()
    t0 = time.perf_counter()
    logits = s.decode(ids, 0, True).astype(np.float64)
    seconds = time.perf_counter() - t0
    pred = logits[:-1]
    top = pred.max(axis=1)
    lse = top + np.log(np.exp(pred - top[:, None]).sum(axis=1))
    target = np.asarray(ids[1:])
    total = float((lse - pred[np.arange(len(target)), target]).sum())
    return {"nll": total, "n": len(target), "seconds": seconds}


def speed(s: Session, req: dict) -> dict:
    """Seconds to prefill a prompt (only the last token's logits) and to decode `n` greedy tokens one by one."""
    ids, n = list(req["ids"]), int(req["n"])
    s.reset()
    t0 = time.perf_counter()
    s.decode(ids, 0, False)
    t1 = time.perf_counter()
    pos = len(ids)
    for _ in range(n):
        s.decode([s.last_argmax()], pos, False)
        pos += 1
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "prefill_tokens": len(ids), "decode_s": t2 - t1, "decode_tokens": n}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        s = Session(cfg)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(1)
    print(json.dumps({"ready": True, "n_vocab": s.n_vocab}), flush=True)
    ops = {"route": route, "nll": nll, "speed": speed}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "tokenize":
                ans = {"ids": [s.tokenize(t, bool(req.get("special", True))) for t in req["texts"]]}
            else:
                ans = ops[req["op"]](s, req)
        except Exception as e:
            ans = {"error": str(e)}
        print(json.dumps(ans), flush=True)


if __name__ == "__main__":
    main()
