#!/usr/bin/env python3
"""Synthetic-weight pi0 / pi0.5 models with the openpi PyTorch module tree, exported as TorchScript.

The models are the test fixtures and the demo input of duquant. The module tree (paths, Linear shapes,
bias flags) follows DESIGN.md section 3 exactly; the forward is an inference pass shaped like openpi's
`sample_actions`: SigLIP over 3 camera images + embedded text tokens form the prefix, which runs once
through the 18 Gemma LLM layers (keeping each layer's K/V), then 10 Euler flow-matching steps run the
action expert over the suffix tokens with attention to the cached prefix.

The weights are random (N(0, 1/fan_in) Linear weights, seeded torch.Generator, so the same seed gives the
same weights) but shaped like a trained Gemma's: a few fixed residual-stream channels carry "massive
activations" (tens of times the median channel) in the LLM and in the expert. Only the weights do it: the
embedding columns, the projector / action-entry biases put them in, two "massive neurons" per MLP (equal
gate/up rows reading those channels, a down_proj column writing them back) keep them growing through depth
and give the down_proj inputs outlier channels, the RMSNorm gains and small weight columns on those channels
in q/k/v/gate/up keep the rest of the model informative and finite. --report-outliers prints the ratios.

Usage:
  make_pi0.py --variant pi0|pi05 --size tiny|full --out DIR [--seed 0] [--batch 1]
              [--exports script,trace] [--text-len N] [--report-outliers] [--verify]
              [--calib-observations 16]

Writes into DIR, for STEM = {variant}_{size}: STEM_script.pt, STEM_trace.pt (as requested by --exports),
STEM.inputs.pt, a scripted container module whose buffers arg0, arg1, ... are the example forward
arguments in order and whose `arg_names: List[str]` attribute holds their names, and the calibration /
evaluation sets of /work/notes/FORMATS.md in the same container format, one observation per file:
STEM.calib/obs_000.inputs.pt .. obs_{N-1} (different images, prompt tokens, state and noise each) and
STEM.heldout.inputs.pt, drawn from a seed no calibration observation uses. `--exports ''` writes only
the inputs files, without building the model (seconds, also at full size).

Forward signatures:
  pi0:  forward(images[B,3,3,H,W], tokens[B,L] int64, state[B,32], noise[B,50,32]) -> actions[B,50,32]
  pi05: forward(images[B,3,3,H,W], tokens[B,L] int64, noise[B,10,32]) -> actions[B,10,32]
(floating inputs in the model's dtype: float32 for tiny, bfloat16 for full).
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class Config:
    variant: str  # "pi0" or "pi05"
    size: str  # "tiny" or "full"
    dtype: torch.dtype
    # SigLIP
    image_size: int
    patch_size: int
    v_width: int
    v_mlp: int
    v_heads: int
    v_layers: int
    # Gemma LLM (PaliGemma language model)
    width: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    # Gemma action expert
    e_width: int
    e_mlp: int
    e_layers: int
    # policy
    action_dim: int
    horizon: int
    text_len: int
    num_images: int = 3
    num_steps: int = 10
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_positions(self) -> int:
        # Room for the images, a text prompt of up to 1024 tokens and the suffix.
        return self.num_images * self.num_patches + 1024 + self.horizon + 1


def make_config(variant: str, size: str, text_len: Optional[int]) -> Config:
    if variant not in ("pi0", "pi05"):
        raise ValueError(f"unknown variant {variant!r}")
    horizon = 50 if variant == "pi0" else 10
    if size == "full":
        cfg = Config(variant=variant, size=size, dtype=torch.bfloat16,
                     image_size=224, patch_size=14, v_width=1152, v_mlp=4304, v_heads=16, v_layers=27,
                     width=2048, mlp=16384, heads=8, kv_heads=1, head_dim=256, layers=18, vocab=1024,
                     e_width=1024, e_mlp=4096, e_layers=18,
                     action_dim=32, horizon=horizon, text_len=48 if variant == "pi0" else 200)
    elif size == "tiny":
        cfg = Config(variant=variant, size=size, dtype=torch.float32,
                     image_size=56, patch_size=14, v_width=256, v_mlp=512, v_heads=4, v_layers=27,
                     width=256, mlp=1024, heads=2, kv_heads=1, head_dim=128, layers=18, vocab=256,
                     e_width=128, e_mlp=512, e_layers=18,
                     action_dim=32, horizon=horizon, text_len=16)
    else:
        raise ValueError(f"unknown size {size!r}")
    if text_len is not None:
        cfg.text_len = text_len
    assert cfg.heads * cfg.head_dim >= 1 and cfg.heads % cfg.kv_heads == 0
    return cfg


# --------------------------------------------------------------------------------------------------
# Shared functions (free functions: inlined by both torch.jit.script and torch.jit.trace)
# --------------------------------------------------------------------------------------------------

def _rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D]; cos, sin: [S, D] in x's dtype
    return x * cos + _rotate_half(x) * sin


def _attend(q: Tensor, k: Tensor, v: Tensor, num_kv: int, scaling: float, bias: Optional[Tensor]) -> Tensor:
    """Grouped-query attention. q: [B, H, S, D]; k, v: [B, KV, T, D]; bias: [S, T] additive (fp32).

    Query head h uses kv head h // (H / KV) (the repeat_kv layout). Returns [B, S, H * D]."""
    b = q.size(0)
    h = q.size(1)
    s = q.size(2)
    d = q.size(3)
    t = k.size(2)
    g = h // num_kv
    qg = q.reshape(b, num_kv, g * s, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scaling  # [B, KV, G*S, T]
    if bias is not None:
        scores = (scores.view(b, num_kv, g, s, t) + bias).view(b, num_kv, g * s, t)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, KV, G*S, D]
    return out.reshape(b, h, s, d).transpose(1, 2).reshape(b, s, h * d)


# --------------------------------------------------------------------------------------------------
# SigLIP vision tower
# --------------------------------------------------------------------------------------------------

class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.v_width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                         padding=0, **fk)
        self.num_patches = cfg.num_patches
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.v_width, **fk)
        self.register_buffer("position_ids", torch.arange(cfg.num_patches, dtype=torch.long).unsqueeze(0))

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values)  # [N, D, h, w]
        x = x.flatten(2).transpose(1, 2)
        return x + self.position_embedding(self.position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        d = cfg.v_width
        self.num_heads = cfg.v_heads
        self.head_dim = d // cfg.v_heads
        self.scale = self.head_dim ** -0.5
        self.k_proj = nn.Linear(d, d, bias=True, **fk)
        self.v_proj = nn.Linear(d, d, bias=True, **fk)
        self.q_proj = nn.Linear(d, d, bias=True, **fk)
        self.out_proj = nn.Linear(d, d, bias=True, **fk)

    def forward(self, x: Tensor) -> Tensor:
        b = x.size(0)
        s = x.size(1)
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        out = _attend(q, k, v, self.num_heads, self.scale, None)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.fc1 = nn.Linear(cfg.v_width, cfg.v_mlp, bias=True, **fk)
        self.fc2 = nn.Linear(cfg.v_mlp, cfg.v_width, bias=True, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.v_width, eps=cfg.norm_eps, **fk)
        self.self_attn = SiglipAttention(cfg, **fk)
        self.layer_norm2 = nn.LayerNorm(cfg.v_width, eps=cfg.norm_eps, **fk)
        self.mlp = SiglipMLP(cfg, **fk)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg, **fk) for _ in range(cfg.v_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg, **fk)
        self.encoder = SiglipEncoder(cfg, **fk)
        self.post_layernorm = nn.LayerNorm(cfg.v_width, eps=cfg.norm_eps, **fk)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg, **fk)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vision_model(pixel_values)


class PaliGemmaMultiModalProjector(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.linear = nn.Linear(cfg.v_width, cfg.width, bias=True, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


# --------------------------------------------------------------------------------------------------
# Gemma (LLM and action expert)
# --------------------------------------------------------------------------------------------------

class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight), computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float, **fk):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, **fk))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class GemmaAdaRMSNorm(nn.Module):
    """pi0.5 adaptive RMSNorm: dense(cond) -> (scale, shift, gate); returns (rms(x) * (1 + scale) + shift, gate)."""

    def __init__(self, dim: int, cond_dim: int, eps: float, **fk):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.dense = nn.Linear(cond_dim, 3 * dim, bias=True, **fk)

    def forward(self, x: Tensor, cond: Tensor) -> Tuple[Tensor, Tensor]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        mod = self.dense(cond).unsqueeze(1)  # [B, 1, 3D]
        scale = mod[:, :, : self.dim]
        shift = mod[:, :, self.dim: 2 * self.dim]
        gate = mod[:, :, 2 * self.dim:]
        out = normed * (1.0 + scale.float()) + shift.float()
        return out.to(x.dtype), gate


class GemmaAttention(nn.Module):
    def __init__(self, width: int, cfg: Config, **fk):
        super().__init__()
        self.num_heads = cfg.heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = nn.Linear(width, cfg.heads * cfg.head_dim, bias=False, **fk)
        self.k_proj = nn.Linear(width, cfg.kv_heads * cfg.head_dim, bias=False, **fk)
        self.v_proj = nn.Linear(width, cfg.kv_heads * cfg.head_dim, bias=False, **fk)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, width, bias=False, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Optional[Tensor], past_v: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        b = x.size(0)
        s = x.size(1)
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        keys = k
        values = v
        if past_k is not None:
            keys = torch.cat([past_k, k], 2)
        if past_v is not None:
            values = torch.cat([past_v, v], 2)
        out = _attend(q, keys, values, self.num_kv_heads, self.scaling, bias)
        return self.o_proj(out), k, v


class GemmaMLP(nn.Module):
    def __init__(self, width: int, mlp: int, **fk):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp, bias=False, **fk)
        self.up_proj = nn.Linear(width, mlp, bias=False, **fk)
        self.down_proj = nn.Linear(mlp, width, bias=False, **fk)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, width: int, mlp: int, cfg: Config, **fk):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(width, cfg.norm_eps, **fk)
        self.self_attn = GemmaAttention(width, cfg, **fk)
        self.post_attention_layernorm = GemmaRMSNorm(width, cfg.norm_eps, **fk)
        self.mlp = GemmaMLP(width, mlp, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Optional[Tensor], past_v: Optional[Tensor],
                bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, bias)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class GemmaAdaDecoderLayer(nn.Module):
    """pi0.5 expert layer: adaRMS norms conditioned on the time embedding, gated residuals."""

    def __init__(self, width: int, mlp: int, cfg: Config, **fk):
        super().__init__()
        self.input_layernorm = GemmaAdaRMSNorm(width, width, cfg.norm_eps, **fk)
        self.self_attn = GemmaAttention(width, cfg, **fk)
        self.post_attention_layernorm = GemmaAdaRMSNorm(width, width, cfg.norm_eps, **fk)
        self.mlp = GemmaMLP(width, mlp, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, bias: Tensor,
                cond: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h, gate = self.input_layernorm(x, cond)
        a, k, v = self.self_attn(h, cos, sin, past_k, past_v, bias)
        x = x + a * gate
        h, gate = self.post_attention_layernorm(x, cond)
        x = x + self.mlp(h) * gate
        return x, k, v


class GemmaModel(nn.Module):
    """PaliGemma's language model: runs the prefix once and returns the stacked per-layer K and V."""

    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.width, **fk)
        self.layers = nn.ModuleList([GemmaDecoderLayer(cfg.width, cfg.mlp, cfg, **fk) for _ in range(cfg.layers)])
        self.norm = GemmaRMSNorm(cfg.width, cfg.norm_eps, **fk)

    def forward(self, inputs_embeds: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        ks: List[Tensor] = []
        vs: List[Tensor] = []
        x = inputs_embeds
        for layer in self.layers:
            x, k, v = layer(x, cos, sin, None, None, None)
            ks.append(k)
            vs.append(v)
        return self.norm(x), torch.stack(ks), torch.stack(vs)


class GemmaExpertModel(nn.Module):
    """pi0 action expert: suffix tokens attend to the cached prefix K/V of the same layer index."""

    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.layers = nn.ModuleList([GemmaDecoderLayer(cfg.e_width, cfg.e_mlp, cfg, **fk)
                                     for _ in range(cfg.e_layers)])
        self.norm = GemmaRMSNorm(cfg.e_width, cfg.norm_eps, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, bias: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x, _k, _v = layer(x, cos, sin, past_k[i], past_v[i], bias)
        return self.norm(x)


class GemmaAdaExpertModel(nn.Module):
    """pi0.5 action expert (adaRMS)."""

    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.layers = nn.ModuleList([GemmaAdaDecoderLayer(cfg.e_width, cfg.e_mlp, cfg, **fk)
                                     for _ in range(cfg.e_layers)])
        self.norm = GemmaAdaRMSNorm(cfg.e_width, cfg.e_width, cfg.norm_eps, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, bias: Tensor,
                cond: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x, _k, _v = layer(x, cos, sin, past_k[i], past_v[i], bias, cond)
        out, _gate = self.norm(x, cond)
        return out


# --------------------------------------------------------------------------------------------------
# Containers with the openpi names
# --------------------------------------------------------------------------------------------------

class PaliGemmaModel(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.vision_tower = SiglipVisionModel(cfg, **fk)
        self.multi_modal_projector = PaliGemmaMultiModalProjector(cfg, **fk)
        self.language_model = GemmaModel(cfg, **fk)


class PaliGemmaForConditionalGeneration(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.model = PaliGemmaModel(cfg, **fk)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False, **fk)  # exists, never called


class GemmaForCausalLM(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.model = GemmaAdaExpertModel(cfg, **fk) if cfg.variant == "pi05" else GemmaExpertModel(cfg, **fk)
        self.lm_head = nn.Linear(cfg.e_width, cfg.vocab, bias=False, **fk)  # exists, never called


class PaliGemmaWithExpertModel(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.paligemma = PaliGemmaForConditionalGeneration(cfg, **fk)
        self.gemma_expert = GemmaForCausalLM(cfg, **fk)


# --------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------

class _PolicyBase(nn.Module):
    def __init__(self, cfg: Config, **fk):
        super().__init__()
        self.paligemma_with_expert = PaliGemmaWithExpertModel(cfg, **fk)
        self.action_in_proj = nn.Linear(cfg.action_dim, cfg.e_width, bias=True, **fk)
        self.action_out_proj = nn.Linear(cfg.e_width, cfg.action_dim, bias=True, **fk)
        self.action_horizon = cfg.horizon
        self.num_steps = cfg.num_steps
        self.embed_scale = math.sqrt(cfg.width)
        self.suffix_len = cfg.horizon + (1 if cfg.variant == "pi0" else 0)
        # Buffers (fp32, cast to the activation dtype where used).
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        freqs = torch.arange(cfg.max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        self.register_buffer("rope_cos", emb.cos().float())
        self.register_buffer("rope_sin", emb.sin().float())
        # openpi create_sinusoidal_pos_embedding(t, width, min_period=4e-3, max_period=4.0)
        fraction = torch.linspace(0.0, 1.0, cfg.e_width // 2, dtype=torch.float64)
        period = 4e-3 * (4.0 / 4e-3) ** fraction
        self.register_buffer("time_freqs", (2 * math.pi / period).float())
        # Suffix attention (openpi make_att_2d_masks): pi0's state token (ar 1) does not see the action
        # tokens (ar 1, 0, ...); pi0.5's action tokens see each other. Prefix keys are visible to all.
        bias = torch.zeros(self.suffix_len, self.suffix_len)
        if cfg.variant == "pi0":
            bias[0, 1:] = -1e9
        self.register_buffer("suffix_attn_bias", bias)

    def embed_prefix(self, images: Tensor, tokens: Tensor) -> Tensor:
        b = images.size(0)
        n_img = images.size(1)
        pixels = images.reshape(b * n_img, images.size(2), images.size(3), images.size(4))
        pg = self.paligemma_with_expert.paligemma.model
        img = pg.multi_modal_projector(pg.vision_tower(pixels))  # [B * n_img, patches, width]
        img = img.reshape(b, n_img * img.size(1), img.size(2))
        txt = pg.language_model.embed_tokens(tokens) * self.embed_scale
        return torch.cat([img, txt], 1)

    def time_embedding(self, t: float, like: Tensor) -> Tensor:
        """Sinusoidal embedding of the flow time t, [B, e_width] in like's dtype (B = like.size(0))."""
        a = self.time_freqs * t
        emb = torch.cat([torch.sin(a), torch.cos(a)], 0).unsqueeze(0)
        return emb.expand(like.size(0), emb.size(1)).to(like.dtype)

    def run_prefix(self, images: Tensor, tokens: Tensor) -> Tuple[Tensor, Tensor, int]:
        prefix = self.embed_prefix(images, tokens)
        p = prefix.size(1)
        cos = self.rope_cos[:p].to(prefix.dtype)
        sin = self.rope_sin[:p].to(prefix.dtype)
        _hidden, past_k, past_v = self.paligemma_with_expert.paligemma.model.language_model(prefix, cos, sin)
        return past_k, past_v, p


class PI0Pytorch(_PolicyBase):
    def __init__(self, cfg: Config, **fk):
        super().__init__(cfg, **fk)
        self.state_proj = nn.Linear(cfg.action_dim, cfg.e_width, bias=True, **fk)
        self.action_time_mlp_in = nn.Linear(2 * cfg.e_width, cfg.e_width, bias=True, **fk)
        self.action_time_mlp_out = nn.Linear(cfg.e_width, cfg.e_width, bias=True, **fk)

    def forward(self, images: Tensor, tokens: Tensor, state: Tensor, noise: Tensor) -> Tensor:
        past_k, past_v, p = self.run_prefix(images, tokens)
        s = self.suffix_len
        cos = self.rope_cos[p: p + s].to(noise.dtype)
        sin = self.rope_sin[p: p + s].to(noise.dtype)
        bias = F.pad(self.suffix_attn_bias, (p, 0))  # [S, P + S]
        expert = self.paligemma_with_expert.gemma_expert.model
        dt = -1.0 / self.num_steps
        x_t = noise
        for step in range(self.num_steps):
            t = 1.0 + step * dt
            state_emb = self.state_proj(state).unsqueeze(1)  # [B, 1, W]
            action_emb = self.action_in_proj(x_t)  # [B, H, W]
            time_emb = self.time_embedding(t, x_t).unsqueeze(1).expand_as(action_emb)
            action_time = self.action_time_mlp_in(torch.cat([action_emb, time_emb], 2))
            action_time = self.action_time_mlp_out(F.silu(action_time))
            suffix = torch.cat([state_emb, action_time], 1)
            out = expert(suffix, cos, sin, past_k, past_v, bias)
            v_t = self.action_out_proj(out[:, -self.action_horizon:])
            x_t = x_t + dt * v_t
        return x_t


class PI05Pytorch(_PolicyBase):
    def __init__(self, cfg: Config, **fk):
        super().__init__(cfg, **fk)
        self.time_mlp_in = nn.Linear(cfg.e_width, cfg.e_width, bias=True, **fk)
        self.time_mlp_out = nn.Linear(cfg.e_width, cfg.e_width, bias=True, **fk)

    def forward(self, images: Tensor, tokens: Tensor, noise: Tensor) -> Tensor:
        past_k, past_v, p = self.run_prefix(images, tokens)
        s = self.suffix_len
        cos = self.rope_cos[p: p + s].to(noise.dtype)
        sin = self.rope_sin[p: p + s].to(noise.dtype)
        bias = F.pad(self.suffix_attn_bias, (p, 0))
        expert = self.paligemma_with_expert.gemma_expert.model
        dt = -1.0 / self.num_steps
        x_t = noise
        for step in range(self.num_steps):
            t = 1.0 + step * dt
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(self.time_embedding(t, x_t)))))
            suffix = self.action_in_proj(x_t)
            out = expert(suffix, cos, sin, past_k, past_v, bias, cond)
            v_t = self.action_out_proj(out[:, -self.action_horizon:])
            x_t = x_t + dt * v_t
        return x_t


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

# Massive-activation recipe (all through the weights).
OUTLIER_FRACTIONS = (0.13, 0.57, 0.81)  # residual-stream channels: int(f * width) + k
OUTLIER_SIGNS = (1.0, -1.0, 1.0)
OUTLIER_SCALES = (1.0, 0.7, 0.5)
MASSIVE_BASE = 150.0  # largest outlier channel entering LLM layer 0 (the other channels ~N(0, 1))
MASSIVE_BASE_EXPERT = 100.0  # the same for the expert (its other channels are a bit smaller)
MASSIVE_NEURONS = 2  # per MLP: gate/up rows that read the outlier channels, down_proj column writes them
MASSIVE_NEURON_Z = 6.0  # pre-activation of those neurons (gelu(z) * z ~ z^2 enters down_proj)
MASSIVE_GROWTH = 0.03  # each layer adds this fraction of the base magnitude to the outlier channels
BLOCK_OUT_SCALE = 0.12  # o_proj / down_proj weights ~ N(0, (0.12 / sqrt(fan_in))^2): bounded residual growth


def outlier_channels(width: int) -> List[int]:
    return [int(f * width) + k for k, f in enumerate(OUTLIER_FRACTIONS, start=1)]


def _normal_(t: Tensor, mean: float, std: float, g: torch.Generator) -> None:
    """t.normal_(mean, std) drawn from g; non-fp32 tensors are filled from fp32 chunks (sampling directly in
    bf16 is several times slower), so no fp32 copy of a whole weight is held."""
    if t.dtype == torch.float32:
        t.normal_(mean, std, generator=g)
        return
    flat = t.view(-1)
    chunk = 1 << 24
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        flat[i: i + n].copy_(torch.empty(n).normal_(mean, std, generator=g))


@torch.no_grad()
def init_weights(model: nn.Module, cfg: Config, g: torch.Generator) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            _normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features), g)
            if m.bias is not None:
                _normal_(m.bias, 0.0, 0.02, g)
        elif isinstance(m, nn.LayerNorm):
            _normal_(m.weight, 1.0, 0.05, g)
            _normal_(m.bias, 0.0, 0.02, g)
        elif isinstance(m, GemmaRMSNorm):
            _normal_(m.weight, 0.0, 0.05, g)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            _normal_(m.weight, 0.0, 1.0 / math.sqrt(fan_in), g)
            _normal_(m.bias, 0.0, 0.02, g)
        elif isinstance(m, nn.Embedding):
            if name.endswith("embed_tokens"):
                _normal_(m.weight, 0.0, 1.0 / math.sqrt(m.embedding_dim), g)  # x sqrt(width) -> N(0, 1)
            else:
                _normal_(m.weight, 0.0, 0.5, g)
    for m in model.modules():
        if isinstance(m, GemmaAdaRMSNorm):
            # Small modulation around the identity: scale ~ 0, shift ~ 0, gate ~ 1.
            m.dense.weight.mul_(0.1)
            m.dense.bias.zero_()
            m.dense.bias[2 * m.dim:] = 1.0

    pg = model.paligemma_with_expert.paligemma.model
    expert = model.paligemma_with_expert.gemma_expert.model
    signs = torch.tensor(OUTLIER_SIGNS)
    mags_llm = [sc * MASSIVE_BASE for sc in OUTLIER_SCALES]  # |outlier| entering layer 0
    mags_exp = [sc * MASSIVE_BASE_EXPERT for sc in OUTLIER_SCALES]

    # Residual-stream outliers at the inputs of the LLM ...
    ch = outlier_channels(cfg.width)
    emb = pg.language_model.embed_tokens.weight
    for c, sign, mag in zip(ch, OUTLIER_SIGNS, mags_llm):
        jitter = 1.0 + 0.05 * torch.randn(emb.size(0), generator=g)
        emb[:, c] = (sign * mag * jitter / math.sqrt(cfg.width)).to(emb.dtype)  # x sqrt(width) in forward
        pg.multi_modal_projector.linear.bias[c] = sign * mag
    # ... and of the expert (every suffix token goes through one of these biases).
    ech = outlier_channels(cfg.e_width)
    entry = [model.state_proj, model.action_time_mlp_out] if cfg.variant == "pi0" else [model.action_in_proj]
    for lin in entry:
        for c, sign, mag in zip(ech, OUTLIER_SIGNS, mags_exp):
            lin.bias[c] = sign * mag

    # Like a trained Gemma: the norms have a gain (RMSNorm divides by an rms that the outliers dominate; the
    # gain brings the other channels back to ~unit scale, and keeps the outlier/median ratio), and the
    # projections reading the residual stream have small weight columns on the outlier channels (the
    # outliers act as a bias, the token-dependent channels carry the information). Massive neurons (two
    # per MLP: equal gate/up rows reading the outlier channels, so gelu(z) * z >= 0, and a down_proj column
    # writing them back) keep the outliers growing through depth and give down_proj inputs outlier channels.
    for layers, norm, width, mlp, chans, mags in (
            (pg.language_model.layers, pg.language_model.norm, cfg.width, cfg.mlp, ch, mags_llm),
            (expert.layers, expert.norm, cfg.e_width, cfg.e_mlp, ech, mags_exp)):
        sum_sq = sum(m * m for m in mags)
        gain = math.sqrt(sum_sq / width + 1.0)
        # normed outlier channel c ~ gain * sqrt(width) * mag_c / sqrt(sum_sq), whatever the depth
        alpha = MASSIVE_NEURON_Z * math.sqrt(sum_sq) / (gain * math.sqrt(width) * sum(mags))
        beta = MASSIVE_GROWTH * mags[0] / (MASSIVE_NEURONS * MASSIVE_NEURON_Z ** 2)
        n = len(layers)
        for i, layer in enumerate(layers):
            for nm in (layer.input_layernorm, layer.post_attention_layernorm):
                if isinstance(nm, GemmaRMSNorm):
                    nm.weight.copy_((1.0 + nm.weight.float()) * gain - 1.0)
                else:  # adaRMS: 1 + scale ~ gain
                    nm.dense.bias[: nm.dim] = gain - 1.0
            growth = 1.0 + MASSIVE_GROWTH * i
            attn, mlp_mod = layer.self_attn, layer.mlp
            # The norms do not tame the token-dependent channels (their rms is dominated by the outliers),
            # so the blocks writing the residual stream get a gain below 1 to keep it from growing.
            attn.o_proj.weight.mul_(BLOCK_OUT_SCALE)
            mlp_mod.down_proj.weight.mul_(BLOCK_OUT_SCALE)
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp_mod.gate_proj, mlp_mod.up_proj):
                for c, mag in zip(chans, mags):
                    lin.weight[:, c] /= mag * growth
            neurons = torch.randperm(mlp, generator=g)[:MASSIVE_NEURONS].tolist()
            for j in neurons:
                row = mlp_mod.gate_proj.weight[j].float()
                row[chans] = alpha * signs
                mlp_mod.gate_proj.weight[j] = row.to(mlp_mod.gate_proj.weight.dtype)
                mlp_mod.up_proj.weight[j] = mlp_mod.gate_proj.weight[j]
                col = mlp_mod.down_proj.weight[:, j].float()
                col[chans] = beta * signs
                mlp_mod.down_proj.weight[:, j] = col.to(mlp_mod.down_proj.weight.dtype)
        if isinstance(norm, GemmaRMSNorm):
            norm.weight.copy_((1.0 + norm.weight.float()) * gain - 1.0)
        else:
            norm.dense.bias[: norm.dim] = gain - 1.0
        final_growth = 1.0 + MASSIVE_GROWTH * n
        readers = [model.action_out_proj] if norm is expert.norm else []
        for lin in readers:
            for c, mag in zip(chans, mags):
                lin.weight[:, c] /= mag * final_growth


class _SkipDefaultInit:
    """Makes the torch.nn modules allocate their parameters (torch.empty, in the requested dtype) without
    running their default initialisation: init_weights() writes every parameter once. This keeps full-size
    generation to one bf16 copy of the weights and avoids the meta device (whose Python kernels are slow
    to import)."""

    CLASSES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.modules.conv._ConvNd)

    def __enter__(self):
        self.saved = [(cls, cls.__dict__["reset_parameters"]) for cls in self.CLASSES]
        for cls in self.CLASSES:
            cls.reset_parameters = lambda self: None
        return self

    def __exit__(self, *exc):
        for cls, fn in self.saved:
            cls.reset_parameters = fn
        return False


def build_model(cfg: Config, seed: int) -> nn.Module:
    fk = {"device": torch.device("cpu"), "dtype": cfg.dtype}
    cls = PI0Pytorch if cfg.variant == "pi0" else PI05Pytorch
    with _SkipDefaultInit():
        model = cls(cfg, **fk)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    init_weights(model, cfg, g)
    return model.eval()


def example_inputs(cfg: Config, batch: int, seed: int) -> Tuple[List[str], List[Tensor]]:
    return observation_inputs(cfg, batch, seed + 1)


# Input seeds: the example inputs use seed + 1 (as they always have); calibration observation i
# uses seed + CALIB_SEED_BASE + i and the held-out set seed + HELDOUT_SEED, so no two of them share
# a seed (and so images, prompt tokens, state and noise) for any --calib-observations below 10^6.
CALIB_SEED_BASE = 1000
HELDOUT_SEED = 999


def observation_inputs(cfg: Config, batch: int, input_seed: int) -> Tuple[List[str], List[Tensor]]:
    """One observation: images, prompt tokens, state and noise drawn from `input_seed`."""
    g = torch.Generator().manual_seed(input_seed)
    hw = cfg.image_size
    images = (torch.rand(batch, cfg.num_images, 3, hw, hw, generator=g) * 2.0 - 1.0).to(cfg.dtype)
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.text_len), generator=g, dtype=torch.long)
    state = torch.randn(batch, cfg.action_dim, generator=g).to(cfg.dtype)
    noise = torch.randn(batch, cfg.horizon, cfg.action_dim, generator=g).to(cfg.dtype)
    if cfg.variant == "pi0":
        return ["images", "tokens", "state", "noise"], [images, tokens, state, noise]
    return ["images", "tokens", "noise"], [images, tokens, noise]


class ExampleInputs(nn.Module):
    """Container for the example inputs: buffers arg0.. in forward order, names in arg_names."""

    arg_names: List[str]

    def __init__(self, names: List[str], tensors: List[Tensor]):
        super().__init__()
        self.arg_names = list(names)
        for i, t in enumerate(tensors):
            self.register_buffer(f"arg{i}", t.detach().clone().contiguous())

    def forward(self) -> int:
        return len(self.arg_names)


# --------------------------------------------------------------------------------------------------
# Outlier report
# --------------------------------------------------------------------------------------------------

def run_with_outlier_report(model: nn.Module, cfg: Config, inputs: List[Tensor], report: bool) -> Tensor:
    """Runs the eager model; with report, prints max/median of the per-channel absmax of some Linear inputs."""
    stats: Dict[str, Tensor] = {}
    handles = []
    if report:
        pg = model.paligemma_with_expert.paligemma.model
        expert = model.paligemma_with_expert.gemma_expert.model
        picks = []
        for prefix, layers in (("llm", pg.language_model.layers), ("expert", expert.layers)):
            n = len(layers)
            for i in sorted({0, n // 2, n - 1}):
                for proj in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
                    picks.append((f"{prefix}.layers.{i}.{proj}", layers[i].get_submodule(proj)))

        def make_hook(key):
            def hook(_mod, inp, _out):
                x = inp[0].detach().float().abs().reshape(-1, inp[0].size(-1)).amax(0)
                stats[key] = torch.maximum(stats[key], x) if key in stats else x
            return hook

        handles = [mod.register_forward_hook(make_hook(key)) for key, mod in picks]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    if report:
        print(f"[make_pi0] outliers ({cfg.variant}_{cfg.size}): max / median of per-channel max|x| over tokens "
              f"(outlier channels: llm {outlier_channels(cfg.width)}, expert {outlier_channels(cfg.e_width)})")
        for key, absmax in stats.items():
            top = torch.topk(absmax, 3)
            med = absmax.median().item()
            print(f"[make_pi0]   {key:32s} in={absmax.numel():6d} max/median={absmax.max().item() / med:8.1f} "
                  f"median={med:9.3g} top channels={top.indices.tolist()} "
                  f"({', '.join(f'{v:.3g}' for v in top.values.tolist())})")
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def count_linear(mod: torch.jit.ScriptModule) -> int:
    return sum(1 for _, m in mod.named_modules() if m.original_name == "Linear")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=["pi0", "pi05"], required=True)
    ap.add_argument("--size", choices=["tiny", "full"], required=True)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--exports", default="script,trace", help="comma-separated subset of script,trace")
    ap.add_argument("--text-len", type=int, default=None,
                    help="text tokens in the example prefix (default: pi0 48, pi05 200 at full size; 16 tiny)")
    ap.add_argument("--report-outliers", action=argparse.BooleanOptionalAction, default=None,
                    help="print outlier ratios of some q_proj/gate_proj/down_proj inputs "
                         "(default: on for tiny, off for full)")
    ap.add_argument("--verify", action="store_true",
                    help="reload the written files, run them on the saved inputs, compare with the eager output")
    ap.add_argument("--calib-observations", type=int, default=16,
                    help="calibration observations written to STEM.calib/ (0: none; the held-out set is "
                         "written whenever this is positive)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 for tiny, torch's default for full)")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)

    exports = [e for e in args.exports.split(",") if e]
    for e in exports:
        if e not in ("script", "trace"):
            ap.error(f"unknown export {e!r}")
    threads = args.threads if args.threads else (1 if args.size == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    report = args.report_outliers if args.report_outliers is not None else args.size == "tiny"
    if args.calib_observations < 0 or args.calib_observations >= HELDOUT_SEED:
        ap.error(f"--calib-observations must lie in 0..{HELDOUT_SEED - 1}")
    inputs_only = not exports and not args.verify
    if inputs_only:
        report = False

    cfg = make_config(args.variant, args.size, args.text_len)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{cfg.variant}_{cfg.size}")

    t0 = time.perf_counter()
    names, inputs = example_inputs(cfg, args.batch, args.seed)
    model = None
    if not inputs_only:
        model = build_model(cfg, args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        n_lin = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
        print(f"[make_pi0] built {cfg.variant}_{cfg.size}: {n_params / 1e6:.1f}M params ({cfg.dtype}), "
              f"{n_lin} nn.Linear, {time.perf_counter() - t0:.2f} s")

    def summary(path: str, n_linear: int, secs: float) -> None:
        print(f"[make_pi0] wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {n_linear} nn.Linear, {secs:.2f} s)")

    def save_inputs(path: str, tensors: List[Tensor]) -> None:
        # Temporary file + rename: a reader never sees a partial container.
        torch.jit.save(torch.jit.script(ExampleInputs(names, tensors)), path + ".tmp")
        os.replace(path + ".tmp", path)

    t = time.perf_counter()
    path = f"{stem}.inputs.pt"
    save_inputs(path, inputs)
    summary(path, 0, time.perf_counter() - t)
    if args.calib_observations > 0:
        t = time.perf_counter()
        calib_dir = f"{stem}.calib"
        os.makedirs(calib_dir, exist_ok=True)
        for stale in os.listdir(calib_dir):
            if stale.startswith("obs_") and stale.endswith(".inputs.pt"):
                os.remove(os.path.join(calib_dir, stale))
        for i in range(args.calib_observations):
            save_inputs(os.path.join(calib_dir, f"obs_{i:03d}.inputs.pt"),
                        observation_inputs(cfg, args.batch, args.seed + CALIB_SEED_BASE + i)[1])
        save_inputs(f"{stem}.heldout.inputs.pt", observation_inputs(cfg, args.batch, args.seed + HELDOUT_SEED)[1])
        print(f"[make_pi0] wrote {args.calib_observations} calibration observations to {calib_dir}/ and "
              f"{stem}.heldout.inputs.pt ({time.perf_counter() - t:.2f} s)")
    if inputs_only:
        print(f"[make_pi0] done (inputs only) in {time.perf_counter() - t0:.2f} s")
        return 0

    eager_out = None
    if report or args.verify:
        t = time.perf_counter()
        eager_out = run_with_outlier_report(model, cfg, inputs, report)
        if not torch.isfinite(eager_out.float()).all():
            print("[make_pi0] ERROR: eager output is not finite", file=sys.stderr)
            return 1
        print(f"[make_pi0] eager forward: out {tuple(eager_out.shape)} {eager_out.dtype}, "
              f"|out| max {eager_out.float().abs().max().item():.3g}, {time.perf_counter() - t:.2f} s")

    written = {}
    for kind in exports:
        t = time.perf_counter()
        with torch.no_grad():
            if kind == "script":
                exported = torch.jit.script(model)
            else:
                exported = torch.jit.trace(model, tuple(inputs), check_trace=False)
        path = f"{stem}_{kind}.pt"
        torch.jit.save(exported, path)
        n = count_linear(exported)
        del exported
        summary(path, n, time.perf_counter() - t)
        written[kind] = path

    if args.verify:
        loaded_inputs = torch.jit.load(f"{stem}.inputs.pt")
        arg_names = list(loaded_inputs.arg_names)
        args_in = [getattr(loaded_inputs, f"arg{i}") for i in range(len(arg_names))]
        assert arg_names == names and loaded_inputs() == len(names)
        outs = {}
        for kind, path in written.items():
            t = time.perf_counter()
            with torch.no_grad():
                outs[kind] = torch.jit.load(path)(*args_in)
            o = outs[kind]
            ok = bool(torch.isfinite(o.float()).all())
            diff = (o.float() - eager_out.float()).abs().max().item()
            print(f"[make_pi0] verify {kind}: finite={ok} max|diff vs eager|={diff:.3g} ({time.perf_counter() - t:.2f} s)")
            if not ok:
                return 1
        if "script" in outs and "trace" in outs:
            tol = 1e-4 if cfg.dtype == torch.float32 else 2e-2
            same = torch.allclose(outs["script"].float(), outs["trace"].float(), rtol=tol, atol=tol)
            print(f"[make_pi0] verify script vs trace: allclose={same}")
            if not same:
                return 1
    print(f"[make_pi0] done in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
