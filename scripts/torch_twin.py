#!/usr/bin/env python3
"""PyTorch twin of moe's model: the makeMoE architecture with moe's parameter names and every
model and router option of moe's config.

Used to produce the golden fixtures that tests/test_twin.cpp and tests/test_model.cpp compare
against, and for side-by-side timing and training runs. Needs torch (Debian: apt-get install
python3-torch, then run with /usr/bin/python3). moe itself never needs it.

  /usr/bin/python3 scripts/torch_twin.py fixtures            # writes every fixture (list below)
  /usr/bin/python3 scripts/torch_twin.py fixtures --only gelu swiglu
  /usr/bin/python3 scripts/torch_twin.py bench --config configs/makemoe.json --steps 20 --threads 1
  /usr/bin/python3 scripts/torch_twin.py train --config configs/makemoe.json [--moe-init]

`fixtures` writes into tests/fixtures/:
  twin_tiny.safetensors       the makeMoE baseline (tests/test_model.cpp). The committed one
                              was made on another machine: made again here, its tensors
                              differ from it by up to 1.4e-6 (PyTorch's kernels for the CPU),
                              so leave it alone unless the baseline itself changes
  twin_<variant>.safetensors  one per entry of VARIANTS below (tests/test_twin.cpp): a tiny
                              model's weights, a batch, fixed router noise, the top-k choices,
                              logits, loss, objective, every gradient, 5 AdamW steps with the
                              balancing-bias updates, the final weights and biases
  twin_init.safetensors       moe's own init (Philox4x32-10 + Box-Muller, reproduced here to the
                              bit) for each model.init kind

Options are table entries: an expert FFN is a row of EXPERT_FFNS, a gating a row of GATINGS,
a balancing loss a row of BALANCE_LOSSES, an init a row of INITS, a fixture a row of VARIANTS.
A new router step (say, jitter of the router input) goes into Router.forward behind its option.
"""
import argparse
import copy
import json
import math
import os
import statistics
import struct
import sys
import time
from collections import namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The makeMoE reference values the twin's bench and train runs start from (a config file
# overrides them); the makeMoE baseline fixture's config is these with its tiny sizes.
DEFAULTS = {
    "data": {"path": "data/tinyshakespeare.txt", "train_fraction": 0.9},
    "model": {"block_size": 32, "n_embed": 128, "n_head": 8, "n_layer": 8, "dropout": 0.1,
              "expert_hidden": 0, "attn_scale": "head"},
    "router": {"num_experts": 8, "top_k": 2, "noisy": True, "noise_at_eval": False},
    "optimizer": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    "training": {"batch_size": 16, "max_steps": 5000, "seed": 1337},
    "logging": {"eval_interval": 100, "eval_iters": 400},
}
# moe's defaults (include/moe/io/config.hpp) of the options beyond makeMoE: filled in by
# resolved(), so that a fixture's stored config names only what it changes.
OPTION_DEFAULTS = {
    "model": {"expert_ffn": "relu", "shared_experts": 0, "init": "kaiming_normal", "init_std": 0.02,
              "norm": "layernorm", "position": "learned", "rope_theta": 10000.0, "n_kv_head": 0, "qk_norm": False,
              "moe_every": 1, "dense_first": 0, "dense_hidden": 0, "tie_embeddings": False},
    "router": {"gating": "topk_softmax", "renormalize": False, "aux_loss_coef": 0.0, "z_loss_coef": 0.0,
               "capacity_factor": 0.0, "capacity_at_eval": False, "bias_update_rate": 0.0, "jitter": 0.0,
               "route_scale": 1.0, "n_groups": 1, "topk_groups": 1, "relu_l1_init": 1e-8, "relu_l1_growth": 1.2,
               "threshold_ema": 0.99, "top_k_anneal_steps": 0},
}


def merged(base, *overrides):
    cfg = copy.deepcopy(base)
    for o in overrides:
        for section, fields in o.items():
            cfg.setdefault(section, {}).update(fields)
    return cfg


def load_config(path):
    if not path:
        return copy.deepcopy(DEFAULTS)
    with open(path) as f:
        return merged(DEFAULTS, json.load(f))


def resolved(cfg):
    """cfg with moe's default for every option it does not set: what the modules read."""
    return merged(OPTION_DEFAULTS, cfg)


# ---- norms (model.norm; also the QK-norm of each head, model.qk_norm) ----
NORM_EPS = 1e-5  # moe's Norm::kEps, LayerNorm's default


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, no bias."""

    def __init__(self, C):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}


# ---- attention ----
ATTN_SCALES = {  # model.attn_scale: the width whose inverse square root scales q·k
    "head": lambda C, H: C // H,
    "embed": lambda C, H: C,  # makeMoE
}


def rope_tables(T, D, theta, dtype):
    """cos, sin [T, D/2] of the angles t·theta^(-2i/D), computed in double (as moe does)."""
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x, cos, sin):
    """model.position = "rope", the rotate-half pairing (GPT-NeoX, Hugging Face Llama): channel
    i of a head pairs with channel i + D/2. x (B, H, T, D)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        C, H = m["n_embed"], m["n_head"]
        self.H, self.H_kv, self.scale = H, m["n_kv_head"] or H, 1.0 / math.sqrt(ATTN_SCALES[m["attn_scale"]](C, H))
        D = C // H
        # rows: q (H heads), k and v (H_kv heads each); head h at rows h*D..(h+1)*D of each,
        # query head h reads key/value head h // (H / H_kv) (grouped-query attention)
        self.qkv = nn.Linear(C, C + 2 * self.H_kv * D, bias=False)
        if m["qk_norm"]:
            self.q_norm, self.k_norm = RMSNorm(D), RMSNorm(D)
        self.qk_norm, self.rope_theta = m["qk_norm"], m["rope_theta"] if m["position"] == "rope" else None
        self.proj = nn.Linear(C, C)
        self.drop = nn.Dropout(m["dropout"])

    def forward(self, x):
        B, T, C = x.shape
        H, H_kv = self.H, self.H_kv
        D = C // H
        q, k, v = self.qkv(x).split([C, H_kv * D, H_kv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, H_kv, D).transpose(1, 2) for t in (k, v))  # (B, H_kv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            cos, sin = rope_tables(T, D, self.rope_theta, q.dtype)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = (t.repeat_interleave(H // H_kv, dim=1) for t in (k, v))
        att = (q @ k.transpose(-2, -1)) * self.scale
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        att = self.drop(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.drop(self.proj(y))


# ---- experts ----
# model.expert_ffn: fc1's activation, and whether a linear branch fc3 multiplies it (then
# Mixtral's form, without biases): fc2(act(fc1 x)) or fc2(act(fc1 x) * fc3 x).
EXPERT_FFNS = {
    "relu": (F.relu, False),
    "gelu": (F.gelu, False),  # the exact erf form
    "swiglu": (F.silu, True),
}


class Expert(nn.Module):
    def __init__(self, m, hidden=None):
        super().__init__()
        C = m["n_embed"]
        F_ = hidden or m["expert_hidden"] or 4 * C
        self.act, gated = EXPERT_FFNS[m["expert_ffn"]]
        self.fc1, self.fc2 = nn.Linear(C, F_, bias=not gated), nn.Linear(F_, C, bias=not gated)
        self.fc3 = nn.Linear(C, F_, bias=False) if gated else None
        self.drop = nn.Dropout(m["dropout"])

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.drop(self.fc2(h))


# ---- router ----
# router.gating: from the router logits [N, E], the scores selection ranks and the weights of
# the chosen experts, a function of their ids [N, K].
def topk_softmax(logits, r):  # makeMoE: softmax over the k kept logits
    return logits, lambda index: F.softmax(logits.gather(-1, index), dim=-1)


def softmax_topk(logits, r):  # Mixtral, Megablocks: softmax over all experts, keep the k largest
    probs = F.softmax(logits, dim=-1)

    def weights(index):
        w = probs.gather(-1, index)
        return w / w.sum(dim=-1, keepdim=True) if r["renormalize"] else w
    return probs, weights


def sigmoid_topk(logits, r):  # DeepSeek-V3: sigmoid scores, the chosen ones renormalised, scaled
    scores = torch.sigmoid(logits)

    def weights(index):
        w = scores.gather(-1, index)
        return w / w.sum(dim=-1, keepdim=True) * r["route_scale"]
    return scores, weights


GATINGS = {"topk_softmax": topk_softmax, "softmax_topk": softmax_topk, "sigmoid_topk": sigmoid_topk}


# Gatings with a variable number of experts per token: every expert is a slot (K = E, in
# descending score), the slots of weight 0 are not run. From the router logits [N, E] (and the
# router, for expert choice's thresholds and C-th scores): scores [N, E] and taken [N, E] bool.
def relu_gating(logits, router):  # ReMoE: gate = ReLU(logit)
    return logits, logits > 0, F.relu(logits)


def expert_choice_gating(logits, router):
    """Zhou et al.: p = softmax over experts; in training each expert takes its C best tokens of
    the batch (ties: the lower token) and its C-th score is kept; else p >= its threshold."""
    r, (N, E) = router.r, logits.shape
    probs = F.softmax(logits, dim=-1)
    p = probs.detach()
    if router.training:
        C = min(N, math.ceil(r["capacity_factor"] * (r["top_k"] * N) / E))
        taken = torch.zeros(N, E, dtype=torch.bool)
        for e in range(E):
            order = sorted(range(N), key=lambda n: (-p[n, e].item(), n))[:C]
            taken[order, e] = True
        router.last_kth = torch.stack([p[:, e][taken[:, e]].min() for e in range(E)])
    else:
        taken = p >= router.threshold
    return probs, taken, probs


VARIABLE_GATINGS = {"relu": relu_gating, "expert_choice": expert_choice_gating}


def group_limited(ranked, r):
    """router.n_groups: experts in groups of E / n_groups; a group scores the sum of its two
    best ranked scores (its one, in groups of one); outside the topk_groups best groups the
    experts cannot be chosen."""
    G = r["n_groups"]
    if G == 1:
        return ranked
    N, E = ranked.shape
    grouped = ranked.view(N, G, E // G)
    group_score = grouped.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # (N, G)
    open_ = torch.zeros(N, G, dtype=torch.bool)
    open_.scatter_(1, group_score.topk(r["topk_groups"], dim=-1).indices, True)
    return grouped.masked_fill(~open_.unsqueeze(-1), -math.inf).view(N, E)

# What the router decides for N tokens: clean logits [N, E] (the balancing losses read them),
# the scores selection ranked (with the balancing bias) [N, E], the chosen ids [N, K] and their
# weights [N, K], which slots the capacity keeps ([N, K] bool, or None: all), the slots each
# expert was chosen for [E], and the capacity (0: none applied).
Plan = namedtuple("Plan", "clean scores index gates keep load capacity")


def capacity_keep(index, gates, E, capacity):
    """router.capacity_factor: an expert chosen for more than `capacity` slots keeps those with
    the largest weights (ties: the earlier slot, slots in token order)."""
    flat_index, flat_gates = index.flatten(), gates.detach().flatten()
    keep = torch.ones_like(flat_index, dtype=torch.bool)
    for e in range(E):
        slots = (flat_index == e).nonzero(as_tuple=True)[0].tolist()  # n*K + k, increasing
        if len(slots) > capacity:
            ranked = sorted(slots, key=lambda s: (-flat_gates[s].item(), s))
            keep[ranked[capacity:]] = False
    return keep.view_as(index)


class Router(nn.Module):
    def __init__(self, C, r):
        super().__init__()
        self.r = r
        E = r["num_experts"]
        self.route, self.noise = nn.Linear(C, E), nn.Linear(C, E)
        self.last_load = None  # slots per expert in the last training forward
        if r["bias_update_rate"] > 0:  # DeepSeek-V3's loss-free balancing: selection only
            self.register_buffer("balance_bias", torch.zeros(E))
        self.last_kth = None  # expert choice: each expert's C-th score in the last training forward
        if r["gating"] == "expert_choice":  # the causal rule's thresholds (-1: none yet)
            self.register_buffer("threshold", torch.full((E,), -1.0))

    def forward(self, x, noise=None, use_noise=True, jitter=None):
        r, (N, E), K = self.r, (x.shape[0], self.r["num_experts"]), self.r["top_k"]
        if self.training and r["jitter"] > 0:  # Megablocks: the router's input times U(1 - ε, 1 + ε)
            if jitter is None:
                jitter = 1 + (torch.rand_like(x) * 2 - 1) * r["jitter"]
            x = x * jitter
        clean = self.route(x)
        logits = clean
        if use_noise:  # noisy top-k: N(0, 1) noise scaled by softplus(noise(x))
            if noise is None:
                noise = torch.randn_like(clean)
            logits = clean + noise * F.softplus(self.noise(x))
        if r["gating"] in VARIABLE_GATINGS:
            scores, taken, weights = VARIABLE_GATINGS[r["gating"]](logits, self)
            index = scores.detach().topk(E, dim=-1).indices  # every expert, descending
            gates = weights.gather(-1, index) * taken.gather(-1, index)
            keep = gates.detach() != 0
            load = torch.bincount(index[keep], minlength=E)
            if self.training:
                self.last_load = load
            return Plan(clean, scores.detach(), index, gates, keep, load, 0)
        scores, weights_of = GATINGS[r["gating"]](logits, r)
        ranked = scores if r["bias_update_rate"] <= 0 else scores + self.balance_bias
        index = group_limited(ranked.detach(), r).topk(K, dim=-1).indices  # descending
        gates = weights_of(index)
        load = torch.bincount(index.flatten(), minlength=E)
        if self.training:
            self.last_load = load
        keep, capacity = None, 0
        if r["capacity_factor"] > 0 and (self.training or r["capacity_at_eval"]):
            capacity = math.ceil(r["capacity_factor"] * (K * N) / E)
            keep = capacity_keep(index, gates, E, capacity)
        return Plan(clean, ranked.detach(), index, gates, keep, load, capacity)

    @torch.no_grad()
    def update_balance_bias(self):
        """After a training step: each expert's bias moves by bias_update_rate toward balance
        (up when the last training forward gave it fewer slots than the mean, down when more)."""
        if self.r["bias_update_rate"] <= 0 or self.last_load is None:
            return
        load = self.last_load
        diff = load.sum() - load * load.numel()  # the mean compared in integers
        self.balance_bias += torch.sign(diff).float() * torch.tensor(self.r["bias_update_rate"], dtype=torch.float32)

    @torch.no_grad()
    def update_threshold(self):
        """Expert choice, after a training step: threshold ← ema · threshold + (1 - ema) · C-th score
        (the first one taken as it is)."""
        if self.r["gating"] != "expert_choice" or self.last_kth is None:
            return
        m = torch.tensor(self.r["threshold_ema"], dtype=torch.float32)
        t = self.threshold
        self.threshold.copy_(torch.where(t < 0, self.last_kth, m * t + (1 - m) * self.last_kth))
        self.last_kth = None


# ---- balancing losses: router.<coef> -> the loss of one layer's plan, averaged over layers ----
def switch_aux_loss(plan):  # Switch Transformer: E · Σ_i f_i P_i, f from the chosen slots
    E = plan.clean.shape[-1]
    f = plan.load.float() / plan.load.sum()
    return E * (f * F.softmax(plan.clean, dim=-1).mean(dim=0)).sum()


def router_z_loss(plan):  # ST-MoE: mean over tokens of logsumexp(logits)²
    return torch.logsumexp(plan.clean, dim=-1).square().mean()


BALANCE_LOSSES = {"aux_loss_coef": switch_aux_loss, "z_loss_coef": router_z_loss}


class MoE(nn.Module):
    def __init__(self, m, r):
        super().__init__()
        self.router = Router(m["n_embed"], r)
        self.experts = nn.ModuleList([Expert(m) for _ in range(r["num_experts"])])
        self.shared = nn.ModuleList([Expert(m) for _ in range(m["shared_experts"])])  # every token

    def forward(self, x, noise=None, use_noise=True, record=None, jitter=None):
        B, T, C = x.shape
        xf = x.reshape(-1, C)
        plan = self.router(xf, noise, use_noise, jitter)
        if record is not None:
            record.append(plan)
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            hit = plan.index == e  # (N, K)
            if plan.keep is not None:
                hit = hit & plan.keep
            rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            w = (plan.gates * hit).sum(dim=-1)[rows].unsqueeze(1)
            out.index_add_(0, rows, expert(xf[rows]) * w)
        for expert in self.shared:
            out = out + expert(xf)
        return out.view(B, T, C), plan


def moe_block(m, l):
    """model.moe_every, model.dense_first (DeepSeek-V3's moe_layer_freq and first_k_dense_replace,
    nanoMoE's stride): block l is MoE when l >= dense_first and l % moe_every == 0."""
    return l >= m["dense_first"] and l % m["moe_every"] == 0


class Block(nn.Module):
    def __init__(self, cfg, l):
        super().__init__()
        m, r = cfg["model"], cfg["router"]
        norm = NORMS[m["norm"]]
        self.ln1 = norm(m["n_embed"])
        self.attn = Attention(m)
        self.ln2 = norm(m["n_embed"])
        if moe_block(m, l):
            self.moe = MoE(m, r)
        else:  # a dense block: one feed-forward of the expert kind, model.dense_hidden wide
            self.ffn = Expert(m, m["dense_hidden"] or 4 * m["n_embed"])


Output = namedtuple("Output", "logits loss objective")


class Twin(nn.Module):
    """moe's Model; parameters registered in moe's order (moe_init relies on it)."""

    def __init__(self, cfg, V):
        super().__init__()
        cfg = resolved(cfg)
        m = cfg["model"]
        self.cfg = cfg
        self.tok_emb = nn.Embedding(V, m["n_embed"])
        self.learned_positions = m["position"] == "learned"  # rope: none here, q and k rotated
        if self.learned_positions:
            self.pos_emb = nn.Embedding(m["block_size"], m["n_embed"])
        self.blocks = nn.ModuleList([Block(cfg, l) for l in range(m["n_layer"])])
        self.ln_f = NORMS[m["norm"]](m["n_embed"])
        self.lm_head = nn.Linear(m["n_embed"], V)
        if cfg["router"]["gating"] == "relu":  # ReMoE's adaptive L1 coefficient, "router.l1_coef"
            self.router = nn.Module()
            self.router.register_buffer("l1_coef", torch.tensor([cfg["router"]["relu_l1_init"]], dtype=torch.float32))
        for mod in self.modules():  # makeMoE: Kaiming-normal Linear weights, other defaults kept
            if isinstance(mod, nn.Linear):
                nn.init.kaiming_normal_(mod.weight)
        if m["tie_embeddings"]:  # the head's weight is the token embedding matrix (named once: tok_emb)
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx, targets=None, noise=None, use_noise=None, record=None, jitter=None):
        """noise: per layer [B*T, E] or None (drawn); use_noise None: the router's rule
        (router.noisy, in training or with noise_at_eval). record: a list that gets each
        layer's Plan. jitter: per layer [B*T, C] factors of the router's input, or None (drawn,
        when training with router.jitter)."""
        r = self.cfg["router"]
        if use_noise is None:
            use_noise = r["noisy"] and (self.training or r["noise_at_eval"])
        B, T = idx.shape
        x = self.tok_emb(idx)
        if self.learned_positions:
            x = x + self.pos_emb(torch.arange(T))
        plans = []  # the MoE blocks'
        for l, b in enumerate(self.blocks):
            x = x + b.attn(b.ln1(x))
            if not hasattr(b, "moe"):
                x = x + b.ffn(b.ln2(x))
                continue
            y, plan = b.moe(b.ln2(x), None if noise is None else noise[l], use_noise, record,
                            None if jitter is None else jitter[l])
            x = x + y
            plans.append(plan)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return Output(logits, None, None)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        objective = loss
        for coef_name, term in BALANCE_LOSSES.items():  # averaged over the MoE layers
            if r[coef_name] > 0 and plans:
                objective = objective + r[coef_name] * sum(term(p) for p in plans) / len(plans)
        if r["gating"] == "relu":  # ReMoE: λ · mean over layers of the mean over tokens of Σ_e gate
            lam = self.router.l1_coef[0].to(objective.dtype)
            for p in plans:
                objective = objective + lam / len(plans) * (p.gates.sum() / p.gates.shape[0])
        self.last_plans = plans if self.training else None
        return Output(logits, loss, objective)

    def update_balance_bias(self):
        """After a training step: the balancing bias, relu's L1 coefficient (× growth while more
        than top_k experts per token are active, ÷ while fewer), expert choice's thresholds."""
        for b in self.blocks:
            if hasattr(b, "moe"):
                b.moe.router.update_balance_bias()
                b.moe.router.update_threshold()
        r = self.cfg["router"]
        if r["gating"] == "relu" and getattr(self, "last_plans", None):
            slots = sum(int(p.keep.sum()) for p in self.last_plans)
            target = r["top_k"] * sum(p.keep.shape[0] for p in self.last_plans)
            growth = torch.tensor(r["relu_l1_growth"], dtype=torch.float32)
            if slots > target:
                self.router.l1_coef.mul_(growth)
            elif slots < target:
                self.router.l1_coef.div_(growth)
        self.last_plans = None


def make_optimizer(model, cfg):
    o = cfg["optimizer"]
    return torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                             weight_decay=o["weight_decay"])


# ---- moe's init, to the bit: its Rng (src/tensor/rng.cpp) for the fills Model::init makes ----
def philox4x32_10(seed, stream, counters):
    """The four words of the Philox4x32-10 blocks of `counters` (uint64 array)."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1 = counters & mask, counters >> np.uint64(32)
    c2 = np.full_like(counters, stream & 0xFFFFFFFF)
    c3 = np.full_like(counters, stream >> 32)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


STREAM_INIT = 1  # kStreamInit (include/moe/tensor/streams.hpp)


class MoeRng:
    """Number i of a fill is block (seed, stream, counter + i); a fill of n advances by n."""

    def __init__(self, seed, stream):
        self.seed, self.stream, self.counter = seed, stream, 0

    def _blocks(self, n):
        counters = np.arange(self.counter, self.counter + n, dtype=np.uint64)
        self.counter += n
        return philox4x32_10(self.seed, self.stream, counters)

    def normal(self, n, std):
        """mean 0 + std·z in float, z = Box-Muller on words 0 and 1 in double with the C
        library's log and cos (math.log and math.cos call the same functions)."""
        w0, w1, _, _ = self._blocks(n)
        z = np.array([math.sqrt(-2.0 * math.log((float(a) + 1.0) / 16777217.0)) *
                      math.cos(6.283185307179586 * (float(b) / 16777216.0))
                      for a, b in zip((w0 >> np.uint64(8)).tolist(), (w1 >> np.uint64(8)).tolist())], dtype=np.float32)
        return np.float32(0) + np.float32(std) * z  # 0 + (-0) is +0, as in C++

    def uniform(self, n, lo, hi):
        """fma(hi - lo, u, lo) in float, u = 24 bits of word 0 / 2^24. In double the product is
        exact and, for lo = -hi (its only use here), so is the sum: one rounding, as fma's."""
        u = (self._blocks(n)[0] >> np.uint64(8)).astype(np.float32) * np.float32(1.0 / 16777216.0)
        span = np.float32(hi) - np.float32(lo)
        return (np.float64(span) * u.astype(np.float64) + np.float64(lo)).astype(np.float32)


def kaiming_bias_bound(fan_in):  # PyTorch's Linear default, 1/sqrt(fan_in), in float as moe computes it
    return np.float32(1.0) / np.sqrt(np.float32(fan_in))


# model.init: how each kind fills an Embedding, a Linear weight and a Linear bias, from
# (rng, n, fan_in, fan_out, init_std). LayerNorms start at weight 1, bias 0 for every kind.
INITS = {
    "kaiming_normal": {  # makeMoE: PyTorch's Embedding and Linear-bias defaults kept
        "embedding": lambda rng, n, fi, fo, std: rng.normal(n, 1.0),
        "weight": lambda rng, n, fi, fo, std: rng.normal(n, math.sqrt(2.0 / fi)),
        "bias": lambda rng, n, fi, fo, std: rng.uniform(n, -kaiming_bias_bound(fi), kaiming_bias_bound(fi)),
    },
    "xavier": {
        "embedding": lambda rng, n, fi, fo, std: rng.normal(n, std),
        "weight": lambda rng, n, fi, fo, std: rng.normal(n, math.sqrt(2.0 / (fi + fo))),
        "bias": lambda rng, n, fi, fo, std: np.zeros(n, np.float32),
    },
    "normal": {
        "embedding": lambda rng, n, fi, fo, std: rng.normal(n, std),
        "weight": lambda rng, n, fi, fo, std: rng.normal(n, std),
        "bias": lambda rng, n, fi, fo, std: np.zeros(n, np.float32),
    },
}


@torch.no_grad()
def moe_init(model, rng):
    """What moe's Model::init(rng) gives for model.init and model.init_std, parameter by
    parameter in registration order (named_parameters' order here)."""
    m = model.cfg["model"]
    fill = INITS[m["init"]]
    owner = {}  # the first module that holds it: a tied head's weight is the embedding's
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mod, name))
    for p in model.parameters():
        mod, name = owner[id(p)]
        n = p.numel()
        if isinstance(mod, (nn.LayerNorm, RMSNorm)):
            v = np.full(n, 1.0 if name == "weight" else 0.0, np.float32)
        elif isinstance(mod, nn.Embedding):
            v = fill["embedding"](rng, n, 0, 0, m["init_std"])
        else:
            v = fill[name](rng, n, mod.in_features, mod.out_features, m["init_std"])
        p.copy_(torch.from_numpy(np.asarray(v, np.float32).reshape(p.shape)))


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


# ---- golden fixtures ----
FIXTURE_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
V, B = 11, 3  # vocabulary and batch of every fixture
ADAMW_STEPS, ADAMW_LR = 5, 1e-2  # AdamW steps on the fixture's batch (betas, eps, weight decay: the defaults)
MIN_GAP = 1e-3  # smallest margin of a routing decision (top-k, capacity) the fixtures accept

# The makeMoE baseline (twin_tiny.safetensors, tests/test_model.cpp): an evaluation forward.
TINY = merged(DEFAULTS, {"model": {"block_size": 8, "n_embed": 16, "n_head": 4, "n_layer": 2, "dropout": 0.0,
                                   "expert_hidden": 32, "attn_scale": "embed"},
                         "router": {"num_experts": 4, "top_k": 2}, "training": {"batch_size": 3}})
# The variants (twin_<name>.safetensors, tests/test_twin.cpp): VARIANT_BASE with the changes,
# in a training forward (dropout 0) or an evaluation one. The router noise (when the router
# adds some) is fixed by the fixture, or with drawn_noise drawn as moe draws it from
# Rng(NOISE_SEED, NOISE_STREAM), new numbers every forward.
Variant = namedtuple("Variant", "changes training drawn_noise", defaults=(True, False))
VARIANT_BASE = merged(TINY, {"model": {"expert_hidden": 16}})
VARIANTS = {
    "gelu": Variant({"model": {"expert_ffn": "gelu"}}),
    "swiglu": Variant({"model": {"expert_ffn": "swiglu"}}),
    "shared1": Variant({"model": {"shared_experts": 1}}),
    "shared2_swiglu": Variant({"model": {"shared_experts": 2, "expert_ffn": "swiglu"}}),
    "softmax_topk": Variant({"router": {"gating": "softmax_topk"}}),
    "softmax_topk_renorm": Variant({"router": {"gating": "softmax_topk", "renormalize": True}}),
    "capacity": Variant({"router": {"capacity_factor": 0.75}}),
    "capacity_eval": Variant({"router": {"capacity_factor": 1.0, "capacity_at_eval": True}}, training=False),
    "capacity_not_at_eval": Variant({"router": {"capacity_factor": 0.75}}, training=False),  # no drops
    "aux_loss": Variant({"router": {"aux_loss_coef": 0.1}}),
    "z_loss": Variant({"router": {"z_loss_coef": 0.01}}),
    "balance_bias": Variant({"router": {"bias_update_rate": 0.05}}),
    "attn_head": Variant({"model": {"attn_scale": "head"}}),
    "noiseless": Variant({"router": {"noisy": False}}),
    "jitter": Variant({"router": {"jitter": 0.1}}),
    "sigmoid_topk": Variant({"router": {"gating": "sigmoid_topk", "route_scale": 2.5}}),
    "sigmoid_groups": Variant({"router": {"gating": "sigmoid_topk", "num_experts": 8, "n_groups": 4,
                                          "topk_groups": 2}}),
    "noise_at_eval": Variant({"router": {"noise_at_eval": True}}, training=False, drawn_noise=True),
    "rmsnorm": Variant({"model": {"norm": "rmsnorm"}}),
    "rope": Variant({"model": {"position": "rope"}}),
    "gqa": Variant({"model": {"n_kv_head": 2}}),  # of n_head 4
    "mqa": Variant({"model": {"n_kv_head": 1}}),
    "qk_norm": Variant({"model": {"qk_norm": True}}),
    "modern": Variant({"model": {"norm": "rmsnorm", "position": "rope", "rope_theta": 500.0, "n_kv_head": 2,
                                 "qk_norm": True, "n_embed": 32}}),  # head size 8
    "topk_dense": Variant({"router": {"top_k": 4}}),  # K = E: dense gating
    "relu": Variant({"router": {"gating": "relu", "relu_l1_init": 0.05}}),
    "expert_choice": Variant({"router": {"gating": "expert_choice", "capacity_factor": 1.0}}),
    "expert_choice_eval": Variant({"router": {"gating": "expert_choice", "capacity_factor": 1.0}}, training=False),
    "all": Variant({"model": {"expert_ffn": "swiglu", "shared_experts": 1, "attn_scale": "head"},
                    "router": {"gating": "softmax_topk", "renormalize": True, "capacity_factor": 1.0,
                               "aux_loss_coef": 0.01, "z_loss_coef": 1e-3, "bias_update_rate": 0.01, "jitter": 0.1}}),
    # Where the MoE layers go (blocks 0 and 2 MoE, 1 and 3 dense), a dense first block, an
    # all-dense model (its router options reach nothing), a tied LM head, and all of them with
    # the balancing losses and bias, which count the MoE layers only.
    "moe_every2": Variant({"model": {"n_layer": 4, "moe_every": 2, "dense_hidden": 24}}),
    "dense_first1": Variant({"model": {"dense_first": 1}}),
    "all_dense": Variant({"model": {"dense_first": 2, "expert_ffn": "swiglu"},
                          "router": {"aux_loss_coef": 0.1, "bias_update_rate": 0.05}}),
    "tied": Variant({"model": {"tie_embeddings": True}}),
    "layout_all": Variant({"model": {"n_layer": 5, "moe_every": 2, "dense_first": 1, "dense_hidden": 24,
                                     "expert_ffn": "gelu", "tie_embeddings": True},
                           "router": {"aux_loss_coef": 0.1, "z_loss_coef": 0.01, "bias_update_rate": 0.05,
                                      "jitter": 0.1}}),
    # The attention/norm options and the layout options together (a rope model with dense blocks and
    # a tied head: the tied head's table is the only embedding).
    "modern_layout": Variant({"model": {"norm": "rmsnorm", "position": "rope", "n_kv_head": 2, "qk_norm": True,
                                        "n_embed": 32, "n_layer": 3, "dense_first": 1, "moe_every": 2,
                                        "dense_hidden": 48, "expert_ffn": "swiglu", "tie_embeddings": True},
                              "router": {"bias_update_rate": 0.05}}),
}
NOISE_SEED, NOISE_STREAM = 99, 3
# model.init kinds for twin_init.safetensors: moe's init of VARIANT_BASE with a shared SwiGLU
# expert (embeddings, LayerNorms, Linears with and without bias).
INIT_KINDS = {"kaiming_normal": {}, "xavier": {}, "normal": {"init_std": 0.05}}
INIT_SEED, INIT_STREAM = 1234, 5


def routing_margins(plan, K, r):
    """The smallest margin of the plan's decisions: between the k-th and (k+1)-th score of a
    token (among its open groups), between the last open and first closed group's score, and
    between the last kept and first dropped weight of an expert over capacity."""
    if r["gating"] in VARIABLE_GATINGS:  # every slot's order, and relu's gates off zero / EC's C-th vs next
        gaps = []
        if r["gating"] == "relu":
            gaps.append(plan.clean.abs().min().item() if plan.scores is None else plan.scores.abs().min().item())
        else:
            N, E = plan.scores.shape
            C = math.ceil(r["capacity_factor"] * (r["top_k"] * N) / E)
            if C < N:
                col = plan.scores.sort(dim=0, descending=True).values
                gaps.append((col[C - 1] - col[C]).min().item())
        return min(gaps)
    open_scores = group_limited(plan.scores, r)
    s = open_scores.sort(dim=-1, descending=True).values
    finite = s[:, K].isfinite() if s.shape[1] > K else None
    gaps = [(s[:, K - 1] - s[:, K])[finite].min().item()] if finite is not None and finite.any() else []
    G = r["n_groups"]
    if G > 1:
        N, E = plan.scores.shape
        gs = plan.scores.view(N, G, E // G).topk(min(2, E // G), dim=-1).values.sum(dim=-1)
        gs = gs.sort(dim=-1, descending=True).values
        gaps.append((gs[:, r["topk_groups"] - 1] - gs[:, r["topk_groups"]]).min().item())
    if plan.keep is not None:
        g, kept = plan.gates.detach().flatten(), plan.keep.flatten()
        for e in range(s.shape[1]):
            slots = plan.index.flatten() == e
            if (slots & ~kept).any():
                gaps.append((g[slots & kept].min() - g[slots & ~kept].max()).item())
    return min(gaps, default=math.inf)


def backward(model, objective):
    """objective.backward(), with a zero gradient for every parameter it does not reach (the
    noise Linear without router noise, an expert without tokens): in moe every parameter has
    a gradient, so AdamW's weight decay reaches them all, where PyTorch's skips them."""
    objective.backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def run_case(cfg, seed, training, drawn_noise):
    """Weights, a batch and router noise from `seed`; a forward and backward, then AdamW steps
    (with the balancing-bias update after each). Returns the tensors of a fixture and what
    the seed search checks."""
    m, r = resolved(cfg)["model"], resolved(cfg)["router"]
    L, E, K = cfg["model"]["n_layer"], r["num_experts"], r["top_k"]
    moe_layers = [l for l in range(L) if moe_block(m, l)]  # noise, jitter and plans: theirs only
    fixed_noise, with_bias = r["noisy"] and not drawn_noise, r["bias_update_rate"] > 0
    T = cfg["model"]["block_size"]
    torch.manual_seed(seed)
    model = Twin(cfg, V)
    idx = torch.randint(V, (B, T))
    targets = torch.randint(V, (B, T))
    per_moe_layer = lambda draw: [draw() if l in moe_layers else None for l in range(L)]  # noqa: E731
    noise = per_moe_layer(lambda: torch.randn(B * T, E)) if fixed_noise else None
    C, eps = cfg["model"]["n_embed"], r["jitter"]
    jitter = per_moe_layer(lambda: 1 + (torch.rand(B * T, C) * 2 - 1) * eps) if training and eps > 0 else None
    rng = MoeRng(NOISE_SEED, NOISE_STREAM)

    def forward_noise():  # the fixed noise, or moe's next draw of each layer's (N, E)
        return per_moe_layer(lambda: torch.from_numpy(rng.normal(B * T * E, 1.0).reshape(B * T, E))) if drawn_noise else noise
    use_noise = True if fixed_noise else None  # moe adds fixed noise always, else by the router's rule
    if with_bias:  # a starting bias of a few update steps, so that the first forward selects with it
        for l in moe_layers:
            model.blocks[l].moe.router.balance_bias.copy_((torch.rand(E) - 0.5) * (20 * r["bias_update_rate"]))
    if r["gating"] == "expert_choice":  # starting thresholds, for the causal rule of evaluation
        for l in moe_layers:
            model.blocks[l].moe.router.threshold.copy_(0.15 + 0.2 * torch.rand(E))
    model.train(training)
    out = {"param." + n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    out.update({"buffer." + n: t.numpy().copy() for n, t in model.named_buffers()})
    out["idx"] = idx.numpy().astype(np.int32)
    out["targets"] = targets.numpy().astype(np.int32)
    for l in moe_layers if fixed_noise else []:
        out[f"noise.{l}"] = noise[l].numpy()
    for l in moe_layers if jitter else []:
        out[f"jitter.{l}"] = jitter[l].numpy()
    state = {n: t.clone() for n, t in model.state_dict().items()}

    record = []
    model.zero_grad()
    first_noise = forward_noise()
    res = model(idx, targets, first_noise, use_noise, record, jitter)
    backward(model, res.objective)
    out["logits"] = res.logits.detach().numpy()
    out["loss"] = np.array([res.loss.item()], dtype=np.float32)
    if res.objective is not res.loss:
        out["objective"] = np.array([res.objective.item()], dtype=np.float32)
    for n, p in model.named_parameters():
        out["grad." + n] = p.grad.numpy().copy()
    first = list(record)
    for l, plan in zip(moe_layers, first):
        ids = plan.index.clone()
        if r["gating"] in VARIABLE_GATINGS:  # moe's ids: per token and expert, e where it runs, else -1
            runs = torch.zeros_like(plan.keep).scatter(1, plan.index, plan.keep)
            ids = torch.where(runs, torch.arange(E).expand_as(ids), torch.full_like(ids, -1))
        out[f"router.{l}.topk"] = ids.numpy().astype(np.int32)
        out[f"router.{l}.gates"] = plan.gates.detach().numpy()
        if plan.keep is not None and plan.capacity > 0:
            out[f"router.{l}.dropped"] = np.array([int((~plan.keep).sum())], dtype=np.int32)

    # The float32 noise floor: the same weights in float64.
    m64 = Twin(cfg, V).double()
    m64.load_state_dict({n: t.double() for n, t in state.items()})
    m64.train(training)
    as_double = lambda ts: None if ts is None else [None if t is None else t.double() for t in ts]  # noqa: E731
    o64 = m64(idx, targets, as_double(first_noise), use_noise, None, as_double(jitter))
    backward(m64, o64.objective)
    gdiff = max((p.grad.float() - torch.from_numpy(out["grad." + n])).abs().max().item() for n, p in m64.named_parameters())
    floor = f"float32 vs float64: objective {res.objective.item():.8f} vs {o64.objective.item():.8f}; " \
            f"max gradient difference {gdiff:.2e}"

    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, objectives = [], []
    for _ in range(ADAMW_STEPS):
        opt.zero_grad()
        o = model(idx, targets, forward_noise(), use_noise, record, jitter)
        losses.append(o.loss.item())
        objectives.append(o.objective.item())
        backward(model, o.objective)
        opt.step()
        model.update_balance_bias()
    out["adamw.losses"] = np.array(losses, dtype=np.float32)
    if res.objective is not res.loss:
        out["adamw.objectives"] = np.array(objectives, dtype=np.float32)
    for n, p in model.named_parameters():
        out["final." + n] = p.detach().numpy().copy()
    out.update({"final_buffer." + n: t.numpy().copy() for n, t in model.named_buffers()})

    checks = {
        "margin": min((routing_margins(p, K, r) for p in record), default=math.inf),
        "counts": [torch.bincount(p.index.flatten(), minlength=E).tolist() for p in first],
        "dropped": sum(int((~p.keep).sum()) for p in first if p.keep is not None and p.capacity > 0),
        "bias_moved": 0,
    }
    for l, p in zip(moe_layers, first) if with_bias else []:  # tokens whose choice the starting bias changed
        plain = (p.scores - torch.from_numpy(out[f"buffer.blocks.{l}.moe.router.balance_bias"])).topk(K).indices
        checks["bias_moved"] += int((plain.sort(dim=-1).values != p.index.sort(dim=-1).values).any(dim=-1).sum())
    return out, checks, floor, (losses, objectives)


def write_fixture(name, cfg, training, first_seed, drawn_noise=False, legacy=False):
    """Searches seeds from first_seed for a case whose routing decisions all have a margin
    (float32 differences cannot flip them), every expert gets slots, the capacity drops some
    and the starting balancing bias changes some choices (where those apply); writes it."""
    m = resolved(cfg)["model"]
    with_bias = resolved(cfg)["router"]["bias_update_rate"] > 0 and any(moe_block(m, l) for l in range(m["n_layer"]))
    for seed in range(first_seed, first_seed + 100):
        out, checks, floor, (losses, objectives) = run_case(cfg, seed, training, drawn_noise)
        if (checks["margin"] > MIN_GAP and all(min(c) > 0 for c in checks["counts"])
                and (checks["dropped"] > 0 or "router.0.dropped" not in out) and (checks["bias_moved"] > 0 or not with_bias)):
            break
    else:
        sys.exit(f"{name}: no seed in [{first_seed}, {first_seed + 100}) gives clear routing decisions")
    print(f"{name}: seed {seed}: smallest routing margin {checks['margin']:.4f}; routed slots per expert per layer "
          f"{checks['counts']}; dropped {checks['dropped']}; choices moved by the starting bias {checks['bias_moved']}")
    print(f"  {floor}")
    print("  AdamW losses", " ".join(f"{x:.6f}" for x in losses),
          *(["objectives", " ".join(f"{x:.6f}" for x in objectives)] if "adamw.objectives" in out else []))
    meta = {"config": json.dumps(cfg), "vocab_size": str(V), "batch_size": str(B), "seed": str(seed),
            "generator": "scripts/torch_twin.py fixtures", "torch": torch.__version__}
    if not legacy:  # the baseline's test reads only the keys above
        meta.update({"variant": name, "training": "1" if training else "0", "adamw_lr": repr(ADAMW_LR),
                     "adamw_steps": str(ADAMW_STEPS)})
        if drawn_noise:
            meta.update({"noise_seed": str(NOISE_SEED), "noise_stream": str(NOISE_STREAM)})
    path = os.path.join(FIXTURE_DIR, f"twin_{name}.safetensors")
    save_safetensors(path, out, meta)
    print(f"  wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def write_init_fixture():
    """moe's Model::init for each model.init kind, reproduced to the bit (twin_init.safetensors)."""
    out, meta = {}, {"vocab_size": str(V), "init_seed": str(INIT_SEED), "init_stream": str(INIT_STREAM),
                     "generator": "scripts/torch_twin.py fixtures", "torch": torch.__version__}
    for kind, fields in INIT_KINDS.items():
        cfg = merged(VARIANT_BASE, {"model": {"expert_ffn": "swiglu", "shared_experts": 1, "init": kind, **fields}})
        model = Twin(cfg, V)
        rng = MoeRng(INIT_SEED, INIT_STREAM)
        moe_init(model, rng)
        for n, p in model.named_parameters():
            out[f"init.{kind}.{n}"] = p.detach().numpy().copy()
        meta[f"config.{kind}"] = json.dumps(cfg)
        meta[f"draws.{kind}"] = str(rng.counter)
        w = model.blocks[0].moe.experts[0].fc1.weight
        print(f"init {kind}: {rng.counter} numbers drawn; blocks.0.moe.experts.0.fc1.weight std {w.std().item():.4f}, "
              f"tok_emb std {model.tok_emb.weight.std().item():.4f}, lm_head.bias max |.| {model.lm_head.bias.abs().max().item():.4f}")
    path = os.path.join(FIXTURE_DIR, "twin_init.safetensors")
    save_safetensors(path, out, meta)
    print(f"  wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


def fixtures(args):
    torch.set_num_threads(1)
    names = args.only or ["tiny", *VARIANTS, "init"]
    for name in names:
        if name == "tiny":
            write_fixture("tiny", TINY, False, args.seed, legacy=True)
        elif name == "init":
            write_init_fixture()
        elif name in VARIANTS:
            v = VARIANTS[name]
            write_fixture(name, merged(VARIANT_BASE, v.changes), v.training, args.seed, v.drawn_noise)
        else:
            sys.exit(f"unknown fixture {name!r}: one of tiny, init, {', '.join(VARIANTS)}")


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
    if args.moe_init:  # the weights `moe train` starts from: model.init from the init stream
        moe_init(model, MoeRng(cfg["training"]["seed"], STREAM_INIT))
    return cfg, train, val, model, make_optimizer(model, cfg)


def bench(args):
    cfg, train, _, model, opt = setup(args)
    B, T = cfg["training"]["batch_size"], cfg["model"]["block_size"]
    times = []
    for i in range(args.steps + 3):
        xb, yb = get_batch(train, B, T)
        t0 = time.perf_counter()
        objective = model(xb, yb).objective
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        model.update_balance_bias()
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
    print(f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    start, times = time.perf_counter(), []
    for it in range(steps):
        if it % every == 0 or it == steps - 1:
            model.eval()
            with torch.no_grad():
                res = []
                for split in (train, val):
                    res.append(sum(model(*get_batch(split, B, T)).loss.item()
                                   for _ in range(iters)) / iters)
            model.train()
            print(f"step {it}: train loss {res[0]:.4f}, val loss {res[1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        t0 = time.perf_counter()
        xb, yb = get_batch(train, B, T)
        objective = model(xb, yb).objective
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        model.update_balance_bias()
        times.append((time.perf_counter() - t0) * 1000)
    print(f"wall {time.perf_counter() - start:.1f} s, median step {statistics.median(times):.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    f = sub.add_parser("fixtures", help="write the golden fixtures into tests/fixtures/")
    f.add_argument("--seed", type=int, default=1, help="first seed each fixture's search tries")
    f.add_argument("--only", nargs="+", metavar="NAME", help="these fixtures only: tiny, init or a variant")
    for name in ("bench", "train"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=None)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--steps", type=int, default=20 if name == "bench" else None,
                       help="timed steps" if name == "bench" else "training steps (default: the config's max_steps)")
        p.add_argument("--moe-init", action="store_true",
                       help="start from moe's init (model.init, drawn as moe draws it) instead of PyTorch's makeMoE init")
    args = ap.parse_args()
    {"fixtures": fixtures, "bench": bench, "train": train_run}[args.mode](args)


if __name__ == "__main__":
    main()
