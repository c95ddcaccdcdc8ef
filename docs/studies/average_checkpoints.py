#!/usr/bin/env python3
"""Averages the trained weights of moe checkpoints, tensor by tensor (a study tool; the
trainer's own running average is training.average_start).

    /usr/bin/python3 docs/studies/average_checkpoints.py OUT.safetensors A.safetensors B.safetensors ...

From each file it takes the weights training continued from: "optimizer.w.<name>" when the
file holds a running average, else "<name>". OUT is the first file with its weights replaced
by the mean (computed in float64, stored as float32) and without a checksum (moe reads files
without one, as it reads files from other writers); `moe eval --checkpoint OUT` evaluates it.
"""
import json
import struct
import sys

import numpy as np


def read(path):
    with open(path, 'rb') as f:
        b = f.read()
    n = struct.unpack('<Q', b[:8])[0]
    return b, n, json.loads(b[8:8 + n])


def tensor(file, name):
    b, n, h = file
    key = 'optimizer.w.' + name if 'optimizer.w.' + name in h else name
    s, e = h[key]['data_offsets']
    return np.frombuffer(b, dtype=np.float32, count=(e - s) // 4, offset=8 + n + s)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, paths = sys.argv[1], sys.argv[2:]
    files = [read(p) for p in paths]
    b0, n0, h0 = files[0]
    data = bytearray(b0[8 + n0:])
    for name, v in h0.items():
        if name == '__metadata__' or name.startswith('optimizer.') or v['dtype'] != 'F32':
            continue
        s, e = v['data_offsets']
        mean = sum(tensor(f, name).astype(np.float64) for f in files) / len(files)
        data[s:e] = mean.astype(np.float32).tobytes()
    h0['__metadata__'].pop('checksum_fnv1a64', None)
    header = json.dumps(h0, separators=(',', ':')).encode()
    header += b' ' * (-len(header) % 8)
    with open(out, 'wb') as f:
        f.write(struct.pack('<Q', len(header)))
        f.write(header)
        f.write(data)


if __name__ == '__main__':
    main()
