"""GGUF files (llama.cpp) read from their headers: metadata, tensor infos and byte ranges, each tensor with
an expert dimension classified (`moesift.arch.gguf`). No tensor data is read. Split models
(`NAME-00001-of-0000N.gguf`) are read as one model.

Every header is checked against the file before anything is trusted: magic and version, string and array
lengths inside the file, known tensor types, shapes whose innermost size is a whole number of blocks,
aligned offsets, and data that neither overlaps nor runs past the end of the file. A damaged file is one
error line naming it."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..arch import gguf as names
from ..arch.spec import MoESpec
from ..core.errors import MoesiftError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS = "split.count", "split.no", "split.tensors.count"
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_DIMS = 4

# ggml tensor types: id -> (name, elements per block, bytes per block); equal to gguf-py's GGML_QUANT_SIZES
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# metadata value types: id -> struct format of a scalar (8: string, 9: array)
INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)  # metadata value types that hold an integer
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
UINT32 = 4


@dataclass
class KV:
    """One metadata entry: its key, value type and value (arrays: a tuple (item type, count), not the items),
    and where its encoded bytes lie in the file."""

    key: str
    vtype: int
    value: Any
    start: int
    end: int


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: innermost first
    offset: int  # absolute byte offset in its file
    nbytes: int
    file: Path
    layer: int | None = None  # block of a tensor with an expert dimension
    kind: str = "other"  # "router" | "router_bias" | "expert" | "other"

    @property
    def dtype(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass
class GGUFFile:
    path: Path
    version: int
    kv: dict[str, KV]
    tensors: list[GGUFTensor]
    kv_start: int  # where the metadata entries begin
    kv_end: int
    alignment: int
    data_start: int
    size: int


def _fail(path: Path, what: str) -> MoesiftError:
    return MoesiftError(f"{str(path)!r} is damaged: {what} (truncated, or not a GGUF file)")


class _Reader:
    """Reads a GGUF header with every length checked against the file size."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise _fail(self.path, f"{what} runs past the end of the {self.size}-byte file")
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY or depth > 2:
            raise _fail(self.path, f"{what} has unknown value type {vtype}")
        itype = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        if itype in SCALARS:
            self.take(count * struct.calcsize(SCALARS[itype]), what)
        elif count > self.size:
            raise _fail(self.path, f"{what} claims {count} items")
        else:
            for _ in range(count):
                self.value(itype, what, depth + 1)
        return (itype, count)


def read_file(path: str | os.PathLike) -> GGUFFile:
    """The header of one GGUF file, checked (see the module docstring)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            return _parse(_Reader(f, p, size), p, size)
    except OSError as e:
        raise MoesiftError(f"cannot read {str(p)!r}: {e.strerror or e}") from None


def _parse(r: _Reader, p: Path, size: int) -> GGUFFile:
    if r.take(4, "the magic") != MAGIC:
        raise MoesiftError(f"{str(p)!r} is not a GGUF file (it does not start with 'GGUF')")
    version = r.unpack("<I", "the version")
    if version not in (2, 3):
        raise MoesiftError(f"{str(p)!r} is GGUF version {version}; moesift reads versions 2 and 3 (little-endian)")
    n_tensors = r.unpack("<Q", "the tensor count")
    n_kv = r.unpack("<Q", "the metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:
        raise _fail(p, f"its header claims {n_tensors} tensors and {n_kv} metadata entries, more than its {size} "
                       "bytes can hold")
    kv: dict[str, KV] = {}
    kv_start = r.f.tell()
    for i in range(n_kv):
        start = r.f.tell()
        k = r.string(f"metadata entry {i}")
        vtype = r.unpack("<I", f"metadata {k!r}")
        v = r.value(vtype, f"metadata {k!r}")
        if k in kv:
            raise _fail(p, f"metadata {k!r} is stored twice")
        kv[k] = KV(k, vtype, v, start, r.f.tell())
    kv_end = r.f.tell()
    align = kv[ALIGNMENT_KEY].value if ALIGNMENT_KEY in kv else DEFAULT_ALIGNMENT
    if not isinstance(align, int) or align < 1 or align & (align - 1):
        raise _fail(p, f"general.alignment {align!r} is not a power of two")
    infos = [_tensor_info(r, p, i) for i in range(n_tensors)]
    data_start = _pad(r.f.tell(), align)
    tensors = []
    for name, shape, t, off, nbytes in infos:
        if off % align:
            raise _fail(p, f"tensor {name!r} starts at offset {off}, not a multiple of the alignment {align}")
        if data_start + off + nbytes > size:
            raise _fail(p, f"the data of tensor {name!r} runs past the end of the {size}-byte file")
        tensors.append(GGUFTensor(name, t, shape, data_start + off, nbytes, p))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors)
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise _fail(p, f"the data of tensors {a!r} and {b!r} overlap")
    if len({t.name for t in tensors}) != len(tensors):
        raise _fail(p, "a tensor name is stored twice")
    return GGUFFile(p, version, kv, tensors, kv_start, kv_end, align, data_start, size)


def _tensor_info(r: _Reader, p: Path, i: int) -> tuple[str, tuple[int, ...], int, int, int]:
    name = r.string(f"tensor info {i}")
    nd = r.unpack("<I", f"tensor {name!r}")
    if not 1 <= nd <= MAX_DIMS:
        raise _fail(p, f"tensor {name!r} has {nd} dimensions")
    shape = tuple(r.unpack("<Q", f"tensor {name!r}") for _ in range(nd))
    t = r.unpack("<I", f"tensor {name!r}")
    off = r.unpack("<Q", f"tensor {name!r}")
    if t not in GGML_TYPES:
        raise MoesiftError(f"{str(p)!r}: tensor {name!r} has ggml type {t}, which moesift does not know")
    _, block, bsize = GGML_TYPES[t]
    if shape[0] % block:
        raise _fail(p, f"tensor {name!r} has rows of {shape[0]} elements, not a whole number of "
                       f"{GGML_TYPES[t][0]} blocks of {block}")
    n = 1
    for s in shape:
        n *= s
    return name, shape, t, off, n // block * bsize


def _pad(n: int, align: int) -> int:
    return n + (-n) % align


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path naming a GGUF file (by its name; its header is checked when read)."""
    return str(path).lower().endswith(".gguf") and not Path(path).is_dir()


def split_paths(path: str | os.PathLike) -> list[Path]:
    """The files of a GGUF model: the file itself, or every split of a split model named by its first split
    (`NAME-00001-of-0000N.gguf`)."""
    p = Path(path)
    if not p.is_file():
        raise MoesiftError(f"GGUF file {str(p)!r} not found")
    m = _SPLIT_NAME.match(p.name)
    if m is None:
        return [p]
    if int(m.group("no")) != 1:
        first = f"{m.group('prefix')}-00001-of-{m.group('count')}.gguf"
        raise MoesiftError(f"{str(p)!r} is split {int(m.group('no'))} of a split GGUF model; pass its first split "
                           f"{first!r}")
    n = int(m.group("count"))
    paths = [p.with_name(f"{m.group('prefix')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [q.name for q in paths if not q.is_file()]
    if missing:
        raise MoesiftError(f"split GGUF model {str(p)!r} is missing {', '.join(missing[:3])}")
    return paths


def split_name(path: Path, no: int, count: int) -> Path:
    """The name of split `no` (1-based) of `count` for an output named `path` (NAME.gguf or
    NAME-00001-of-0000N.gguf)."""
    if count == 1:
        return path
    m = _SPLIT_NAME.match(path.name)
    prefix = m.group("prefix") if m else path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return path.with_name(f"{prefix}-{no:05d}-of-{count:05d}.gguf")


@dataclass
class GGUFIndex:
    """A GGUF model (one file or its splits) read from its headers, with its MoE shape."""

    files: list[GGUFFile]
    arch: str
    family: names.GGUFFamily
    spec: MoESpec
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar metadata of the first file

    @property
    def directory(self) -> Path:
        return self.files[0].path

    @property
    def tensors(self) -> list[GGUFTensor]:
        return [t for f in self.files for t in f.tensors]

    def key(self, name: str) -> str:
        return names.key(self.arch, name)

    def meta(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(self.key(name), default)

    def nextn_blocks(self) -> list[int]:
        """The multi-token-prediction blocks stored after the decoder blocks (GLM-4.5)."""
        n = int(self.meta(names.NEXTN_PREDICT_LAYERS, 0) or 0) if self.family.nextn else 0
        blocks = int(self.meta(names.BLOCK_COUNT, 0) or 0)
        return list(range(blocks - n, blocks)) if n else []

    def model_shape(self) -> dict[str, Any]:
        """The fields a plan's model is checked on (named as in a transformers config)."""
        return {"model_type": self.spec.model_type, "num_hidden_layers": int(self.meta(names.BLOCK_COUNT, 0))
                - len(self.nextn_blocks()), "n_experts": self.spec.n_experts, "top_k": self.spec.top_k,
                "hidden_size": self.meta(names.EMBEDDING_LENGTH), "moe_layers": list(self.spec.moe_layers)}

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.kind] = out.get(t.kind, 0) + t.nbytes
        return out

    def expert_bytes(self) -> dict[int, dict[int, int]]:
        """{block: {expert id: bytes}} (every tensor with an expert dimension split evenly over the experts)."""
        E = self.spec.n_experts
        out: dict[int, dict[int, int]] = {}
        for t in self.tensors:
            if t.layer is None or t.layer in self.nextn_blocks():
                continue
            per = out.setdefault(t.layer, dict.fromkeys(range(E), 0))
            for e in range(E):
                per[e] += t.nbytes // E
        return out

    def predicted_bytes(self, resident: dict[int, list[int]]) -> int:
        """Tensor bytes of the model trimmed to `resident` (blocks not named are kept whole)."""
        dropped = 0
        for layer, eb in self.expert_bytes().items():
            keep = set(resident.get(layer, eb.keys()))
            dropped += sum(b for e, b in eb.items() if e not in keep)
        if dropped:  # a trim that removes experts leaves the multi-token-prediction blocks out
            nextn = set(self.nextn_blocks())
            dropped += sum(t.nbytes for t in self.tensors if names.block_of(t.name) in nextn)
        return self.total_bytes() - dropped


def read_gguf(path: str | os.PathLike) -> GGUFIndex:
    """The GGUF model at `path` (a file, or the first split of a split model), its tensors classified."""
    paths = split_paths(path)
    files = [read_file(q) for q in paths]
    _check_splits(files)
    first = files[0]
    shown = str(first.path)
    meta = {k: v.value for k, v in first.kv.items() if v.vtype != ARRAY}
    fam = names.family(meta.get("general.architecture"), shown)
    arch = fam.arch
    E, K = (_count(meta, names.key(arch, k), shown) for k in (names.EXPERT_COUNT, names.EXPERT_USED_COUNT))
    if K > E:
        raise MoesiftError(f"{shown!r}: {arch}.expert_used_count {K} exceeds {arch}.expert_count {E}")
    moe: set[int] = set()
    for f in files:
        for t in f.tensors:
            role = names.expert_role(t.name)
            if role is None:
                continue
            t.layer, t.kind = role
            if t.shape[-1] != E:
                raise MoesiftError(f"{shown!r}: tensor {t.name!r} has {t.shape[-1]} experts along its last "
                                   f"dimension, but {arch}.expert_count is {E}; the file is inconsistent")
            if t.kind == names.ROUTER:
                moe.add(t.layer)
    group = meta.get(names.key(arch, names.EXPERT_GROUP_COUNT))
    grouped = isinstance(group, int) and group > 1
    if grouped and E % group:
        raise MoesiftError(f"{shown!r}: {arch}.expert_group_count {group} does not divide expert_count {E}")
    gating = meta.get(names.key(arch, names.EXPERT_GATING_FUNC))
    nextn = set()
    if fam.nextn:
        blocks = int(meta.get(names.key(arch, names.BLOCK_COUNT), 0) or 0)
        nextn = set(range(blocks - int(meta.get(names.key(arch, names.NEXTN_PREDICT_LAYERS), 0) or 0), blocks))
    spec = MoESpec(
        model_type=names.model_type(fam, gating), moe_layers=tuple(sorted(moe - nextn)), n_experts=E, top_k=K,
        n_shared=int(meta.get(names.key(arch, names.EXPERT_SHARED_COUNT), 0) or 0),
        scoring="sigmoid" if gating == names.GATING_SIGMOID else "softmax",
        n_group=group if grouped else None,
        topk_group=meta.get(names.key(arch, names.EXPERT_GROUP_USED_COUNT)) if grouped else None)
    if not spec.moe_layers:
        raise MoesiftError(f"{shown!r} has no router tensors (blk.N.ffn_gate_inp.weight); it is not a MoE model")
    return GGUFIndex(files, arch, fam, spec, meta)


def _count(meta: dict[str, Any], k: str, shown: str) -> int:
    v = meta.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise MoesiftError(f"{shown!r} has no {k!r} (a positive integer); it is not a MoE model moesift can trim")
    return v


def _check_splits(files: list[GGUFFile]) -> None:
    n = len(files)
    for i, f in enumerate(files):
        kv = f.kv
        count = kv[SPLIT_COUNT].value if SPLIT_COUNT in kv else 1
        no = kv[SPLIT_NO].value if SPLIT_NO in kv else 0
        if count != n or no != i:
            raise MoesiftError(f"{str(f.path)!r} says it is split {no + 1} of {count}; its name makes it {i + 1} of {n}")


RECORD_SUFFIX = ".moesift.json"


def record_path(first: Path) -> Path:
    """The record a GGUF trim leaves beside its first output file."""
    return first.with_name(first.name + RECORD_SUFFIX)


def read_gguf_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a trimmed GGUF model (`NAME.gguf.moesift.json` beside its first file), or None."""
    p = Path(path)
    m = _SPLIT_NAME.match(p.name)
    if m is not None:
        p = p.with_name(f"{m.group('prefix')}-00001-of-{m.group('count')}.gguf")
    r = record_path(p)
    if not r.is_file():
        return None
    try:
        d = json.loads(r.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoesiftError(f"{str(r)!r} is not valid JSON; the record of the trimmed GGUF model is damaged") from None
    if not isinstance(d, dict) or d.get("layout") != "gguf":
        raise MoesiftError(f"{str(r)!r} is not the record of a trimmed GGUF model")
    return d


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What moesift reads of a GGUF model: architecture, model type, MoE shape, tensor bytes, ggml types."""
    idx = read_gguf(path)
    return {"path": str(idx.directory), "files": [str(f.path) for f in idx.files], "arch": idx.arch,
            **idx.model_shape(), "tensor_bytes": idx.total_bytes(),
            "types": sorted({t.dtype for t in idx.tensors})}
