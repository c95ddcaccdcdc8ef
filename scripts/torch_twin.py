#!/usr/bin/env python3
"""PyTorch twin of moe's model: the makeMoE architecture with moe's parameter names.

Used to produce the golden fixtures that tests/test_model.cpp compares against, and for
side-by-side timing and training runs. Needs torch (Debian: apt-get install python3-torch,
then run with /usr/bin/python3). moe itself never needs it.

  /usr/bin/python3 scripts/torch_twin.py fixtures            # writes tests/fixtures/twin_tiny.safetensors
  /usr/bin/python3 scripts/torch_twin.py bench --config configs/makemoe.json --steps 20 --threads 1
  /usr/bin/python3 scripts/torch_twin.py train --config configs/makemoe.json
"""
import argparse
import json
import math
import os
import statistics
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULTS = {
    "data": {"path": "data/tinyshakespeare.txt", "train_fraction": 0.9},
    "model": {"block_size": 32, "n_embed": 128, "n_head": 8, "n_layer": 8, "dropout": 0.1,
              "expert_hidden": 0, "attn_scale": "head"},
    "router": {"num_experts": 8, "top_k": 2, "noisy": True, "noise_at_eval": False},
    "optimizer": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    "training": {"batch_size": 16, "max_steps": 5000, "seed": 1337},
    "logging": {"eval_interval": 100, "eval_iters": 400},
}


def load_config(path):
    cfg = json.loads(json.dumps(DEFAULTS))
    if path:
        with open(path) as f:
            user = json.load(f)
        for section, fields in user.items():
            cfg.setdefault(section, {}).update(fields)
    return cfg


class Attention(nn.Module):
    def __init__(self, C, H, scale, dropout):
        super().__init__()
        self.H, self.scale = H, scale
        self.qkv = nn.Linear(C, 3 * C, bias=False)  # rows: q, k, v; head h at rows h*D..(h+1)*D
        self.proj = nn.Linear(C, C)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        D = C // self.H
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) * self.scale
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        att = self.drop(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.drop(self.proj(y))


class Expert(nn.Module):
    def __init__(self, C, F_, dropout):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(C, F_), nn.Linear(F_, C), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.relu(self.fc1(x))))


class Router(nn.Module):
    def __init__(self, C, E):
        super().__init__()
        self.route, self.noise = nn.Linear(C, E), nn.Linear(C, E)


class MoE(nn.Module):
    def __init__(self, C, E, K, F_, dropout):
        super().__init__()
        self.K = K
        self.router = Router(C, E)
        self.experts = nn.ModuleList([Expert(C, F_, dropout) for _ in range(E)])

    def forward(self, x, noise=None, use_noise=True, record=None):
        B, T, C = x.shape
        xf = x.reshape(-1, C)
        logits = self.router.route(xf)
        if use_noise:
            if noise is None:
                noise = torch.randn_like(logits)
            logits = logits + noise * F.softplus(self.router.noise(xf))
        top_vals, top_idx = logits.topk(self.K, dim=-1)  # descending
        gates = F.softmax(top_vals, dim=-1)  # softmax over the kept logits only
        if record is not None:
            record.append((top_idx, gates, logits))
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            hit = top_idx == e  # (N, K)
            rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            w = (gates * hit).sum(dim=-1)[rows].unsqueeze(1)
            out.index_add_(0, rows, expert(xf[rows]) * w)
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, r = cfg["model"], cfg["router"]
        C, H = m["n_embed"], m["n_head"]
        scale = (C if m["attn_scale"] == "embed" else C // H) ** -0.5
        F_ = m["expert_hidden"] or 4 * C
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = Attention(C, H, scale, m["dropout"])
        self.moe = MoE(C, r["num_experts"], r["top_k"], F_, m["dropout"])


class Twin(nn.Module):
    def __init__(self, cfg, V):
        super().__init__()
        m = cfg["model"]
        self.cfg = cfg
        self.tok_emb = nn.Embedding(V, m["n_embed"])
        self.pos_emb = nn.Embedding(m["block_size"], m["n_embed"])
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(m["n_layer"])])
        self.ln_f = nn.LayerNorm(m["n_embed"])
        self.lm_head = nn.Linear(m["n_embed"], V)
        for mod in self.modules():  # makeMoE: Kaiming-normal Linear weights, other defaults kept
            if isinstance(mod, nn.Linear):
                nn.init.kaiming_normal_(mod.weight)

    def forward(self, idx, targets=None, noise=None, use_noise=True, record=None):
        B, T = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T))
        for l, b in enumerate(self.blocks):
            x = x + b.attn(b.ln1(x))
            x = x + b.moe(b.ln2(x), None if noise is None else noise[l], use_noise, record)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def make_optimizer(model, cfg):
    o = cfg["optimizer"]
    return torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                             weight_decay=o["weight_decay"])


# ---- safetensors writer (the format is small enough to write by hand) ----
def save_safetensors(path, tensors, metadata):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dtype = {np.dtype("float32"): "F32", np.dtype("int32"): "I32"}[arr.dtype]
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata
    hs = json.dumps(header, separators=(",", ":")).encode()
    hs += b" " * ((8 - len(hs) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hs)))
        f.write(hs)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def fixtures(args):
    torch.set_num_threads(1)
    cfg = load_config(None)
    cfg["model"].update({"block_size": 8, "n_embed": 16, "n_head": 4, "n_layer": 2, "dropout": 0.0,
                         "expert_hidden": 32, "attn_scale": "embed"})
    cfg["router"].update({"num_experts": 4, "top_k": 2})
    cfg["training"].update({"batch_size": 3})
    V, B, T, L, E, K = 11, 3, 8, 2, 4, 2
    for seed in range(args.seed, args.seed + 100):
        torch.manual_seed(seed)
        model = Twin(cfg, V)
        idx = torch.randint(V, (B, T))
        targets = torch.randint(V, (B, T))
        noise = [torch.randn(B * T, E) for _ in range(L)]
        record = []
        with torch.no_grad():
            model(idx, targets, noise, True, record)
        gaps = []
        for _, _, logits in record:
            s = logits.sort(dim=-1, descending=True).values
            gaps.append((s[:, K - 1] - s[:, K]).min().item())
        counts = [torch.bincount(r[0].flatten(), minlength=E).tolist() for r in record]
        if min(gaps) > 1e-3 and all(min(c) > 0 for c in counts):
            break
    print(f"seed {seed}: smallest top-k gap {min(gaps):.4f}; routed slots per expert per layer {counts}")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    for n, p in params.items():
        out["param." + n] = p.numpy().copy()
    out["idx"] = idx.numpy().astype(np.int32)
    out["targets"] = targets.numpy().astype(np.int32)
    for l in range(L):
        out[f"noise.{l}"] = noise[l].numpy()

    record = []
    model.zero_grad()
    logits, loss = model(idx, targets, noise, True, record)
    loss.backward()
    out["logits"] = logits.detach().numpy()
    out["loss"] = np.array([loss.item()], dtype=np.float32)
    for n, p in model.named_parameters():
        out["grad." + n] = p.grad.numpy().copy()
    for l, (top_idx, gates, _) in enumerate(record):
        out[f"router.{l}.topk"] = top_idx.numpy().astype(np.int32)
        out[f"router.{l}.gates"] = gates.detach().numpy()

    # The float32 noise floor: the same weights in float64.
    m64 = Twin(cfg, V).double()
    m64.load_state_dict({n: p.double() for n, p in params.items()})
    l64 = m64(idx, targets, [n.double() for n in noise], True)[1]
    l64.backward()
    gdiff = max((p.grad.float() - torch.from_numpy(out["grad." + n])).abs().max().item() for n, p in m64.named_parameters())
    print(f"float32 vs float64: loss {loss.item():.8f} vs {l64.item():.8f}; max gradient difference {gdiff:.2e}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        _, l = model(idx, targets, noise, True)
        losses.append(l.item())
        l.backward()
        opt.step()
    out["adamw.losses"] = np.array(losses, dtype=np.float32)
    for n, p in model.named_parameters():
        out["final." + n] = p.detach().numpy().copy()
    print("AdamW losses", " ".join(f"{x:.6f}" for x in losses))
    meta = {"config": json.dumps(cfg), "vocab_size": str(V), "batch_size": str(B), "seed": str(seed),
            "generator": "scripts/torch_twin.py fixtures", "torch": torch.__version__}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "twin_tiny.safetensors")
    save_safetensors(os.path.normpath(path), out, meta)
    print(f"wrote {os.path.normpath(path)}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def load_data(cfg):
    with open(cfg["data"]["path"], encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(cfg["data"]["train_fraction"] * len(data))
    return data[:n], data[n:], len(chars)


def get_batch(data, B, T):
    ix = torch.randint(len(data) - T, (B,))
    return torch.stack([data[i:i + T] for i in ix]), torch.stack([data[i + 1:i + T + 1] for i in ix])


def setup(args):
    """Config, data splits, a fresh model and its optimizer, as both bench and train use them."""
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    torch.manual_seed(cfg["training"]["seed"])
    train, val, V = load_data(cfg)
    model = Twin(cfg, V)
    return cfg, train, val, model, make_optimizer(model, cfg)


def bench(args):
    cfg, train, _, model, opt = setup(args)
    B, T = cfg["training"]["batch_size"], cfg["model"]["block_size"]
    times = []
    for i in range(args.steps + 3):
        xb, yb = get_batch(train, B, T)
        t0 = time.perf_counter()
        _, loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up steps are not timed
            times.append((time.perf_counter() - t0) * 1000)
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"threads": args.threads, "steps": args.steps, "median_ms": statistics.median(times),
                      "min_ms": min(times), "max_ms": max(times), "parameters": n_params}))


def train_run(args):
    cfg, train, val, model, opt = setup(args)
    B, T = cfg["training"]["batch_size"], cfg["model"]["block_size"]
    steps = args.steps if args.steps is not None else cfg["training"]["max_steps"]
    every, iters = cfg["logging"]["eval_interval"], cfg["logging"]["eval_iters"]
    noise_at_eval = cfg["router"]["noise_at_eval"]
    print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    start, times = time.perf_counter(), []
    for it in range(steps):
        if it % every == 0 or it == steps - 1:
            model.eval()
            with torch.no_grad():
                res = []
                for split in (train, val):
                    res.append(sum(model(*get_batch(split, B, T), use_noise=noise_at_eval)[1].item()
                                   for _ in range(iters)) / iters)
            model.train()
            print(f"step {it}: train loss {res[0]:.4f}, val loss {res[1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        xb, yb = get_batch(train, B, T)
        _, loss = model(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append((time.perf_counter() - t0) * 1000)
    print(f"wall {time.perf_counter() - start:.1f} s, median step {statistics.median(times):.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fixtures", help="write tests/fixtures/twin_tiny.safetensors")
    f.add_argument("--seed", type=int, default=1)
    for name in ("bench", "train"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=None)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--steps", type=int, default=20 if name == "bench" else None,
                       help="timed steps" if name == "bench" else "training steps (default: the config's max_steps)")
    args = ap.parse_args()
    {"fixtures": fixtures, "bench": bench, "train": train_run}[args.mode](args)


if __name__ == "__main__":
    main()
