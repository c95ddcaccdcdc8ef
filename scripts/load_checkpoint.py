#!/usr/bin/env python3
"""Load a moe checkpoint (safetensors) into numpy arrays. Needs numpy only.

  /usr/bin/python3 scripts/load_checkpoint.py runs/tiny/best.safetensors  # list tensors and metadata
  /usr/bin/python3 scripts/load_checkpoint.py --verify CKPT                # also check the checksum

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


def fnv1a64(data, basis=0xCBF29CE484222325):
    """The checksum moe stores in metadata "checksum_fnv1a64" (pure Python: about 5 s per 100 MB)."""
    h = basis
    for b in bytes(data):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def load(path, verify=False):
    """Returns (dict name -> np.ndarray, metadata dict of strings), tensors in file order.

    Raises ValueError naming the path on a malformed file; with verify=True also checks the
    data against the stored checksum (files from other writers may have none: then no check).
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short ({len(raw)} bytes) to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} exceeds the file ({len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: header is not valid JSON: {e}") from None
    data = memoryview(raw)[8 + n:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor {name} has data offsets [{begin}, {end}) outside the "
                             f"{len(data)}-byte data section (truncated?)")
        shape = info["shape"]
        if int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize != end - begin:
            raise ValueError(f"{path}: tensor {name}: shape {shape} of {dtype} does not fill [{begin}, {end})")
        tensors[name] = np.frombuffer(data[begin:end], dtype=DTYPES[dtype]).reshape(shape).copy()
    if verify and "checksum_fnv1a64" in metadata:
        actual = fnv1a64(data)
        # Files written before moe corrected its FNV basis carry a checksum with 1469598103934665603.
        if actual != metadata["checksum_fnv1a64"] and fnv1a64(data, 1469598103934665603) != metadata["checksum_fnv1a64"]:
            raise ValueError(f"{path}: checksum mismatch (stored {metadata['checksum_fnv1a64']}, data {actual})")
    return tensors, metadata


def main():
    args = [a for a in sys.argv[1:] if a != "--verify"]
    if len(args) != 1:
        sys.exit(__doc__)
    try:
        tensors, metadata = load(args[0], verify="--verify" in sys.argv[1:])
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    for name, a in tensors.items():
        print(f"{name:60s} {str(a.dtype):8s} {list(a.shape)}")
    n = sum(a.size for k, a in tensors.items() if not k.startswith("optimizer."))
    print(f"{len(tensors)} tensors, {n} model parameters")
    for k, v in metadata.items():
        print(f"metadata {k}: {v if len(v) < 100 else v[:100] + '...'}")


if __name__ == "__main__":
    main()
