#!/usr/bin/env python3
"""Load a moe checkpoint (safetensors) into numpy arrays. Needs numpy only.

  python3 scripts/load_checkpoint.py runs/tiny/best.safetensors      # list tensors and metadata

  from load_checkpoint import load
  tensors, metadata = load("runs/tiny/best.safetensors")
  tensors["blocks.0.attn.qkv.weight"].shape   # (3*n_embed, n_embed), torch.nn.Linear layout
  json.loads(metadata["config"])              # the resolved training config
"""
import json
import struct
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("load_checkpoint.py needs numpy (Debian: apt-get install python3-numpy; then use /usr/bin/python3)")

DTYPES = {"F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U8": "u1"}


def load(path):
    """Returns (dict name -> np.ndarray, metadata dict of strings)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        tensors[name] = np.frombuffer(data[begin:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return tensors, metadata


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    tensors, metadata = load(sys.argv[1])
    for name, a in tensors.items():
        print(f"{name:60s} {str(a.dtype):8s} {list(a.shape)}")
    n = sum(a.size for k, a in tensors.items() if not k.startswith("optimizer."))
    print(f"{len(tensors)} tensors, {n} model parameters")
    for k, v in metadata.items():
        print(f"metadata {k}: {v if len(v) < 100 else v[:100] + '...'}")


if __name__ == "__main__":
    main()
