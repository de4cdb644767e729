"""A deliberately simple reference trimmer for tests: loads the whole (tiny) checkpoint into memory,
slices every expert-indexed tensor by the adapter's classification and writes a standard checkpoint.
moesift.trim must agree with it; it is not used by the product."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moesift.arch import adapter_for
from moesift.formats.checkpoint import shard_files


def naive_trim(src: Path, dst: Path, resident: dict[int, list[int]]) -> Path:
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    adapter = adapter_for(cfg)
    sd = {}
    for f in shard_files(src):
        sd.update(load_file(str(src / f)))
    out = {}
    for name, t in sd.items():
        role = adapter.classify(name, cfg)
        keep = sorted(resident.get(role.layer, [])) if role.layer is not None else []
        if role.layer not in resident or role.kind not in ("expert", "router", "router_bias"):
            out[name] = t
        elif role.expert is not None:
            if role.expert in keep:
                out[adapter.rename_expert(name, cfg, keep.index(role.expert))] = t
        else:
            out[name] = adapter.slice_experts(t, role, keep, cfg)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(adapter.rewrite_config(cfg, resident), indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst
