"""An independent PyTorch port of the cache-augmentation training loss, checked by golden vectors.

    python examples/torch_port.py tiny_data/golden/default /tmp/port.npz [--dtype float32]
    refimpl golden verify tiny_data/golden/default --actual /tmp/port.npz

It reads ONLY the golden files (manifest.json for the config, the latents' position ids
config.latent_positions and the Adam settings; tensors.npz for the weights, tokens, trace
positions and soft tokens) and never imports refimpl. It is written from the conventions in
docs/golden.md, in plain torch (a ~60-line Llama), and computes the loss a different way from
refimpl's training code: the decoder runs the packed one-pass form (the paper's Fig. 2: original
tokens followed by all K trace groups, one [S, S] mask, built here by explicit loops), while
refimpl's golden outputs come from its cached three-pass form. Gradients are torch autograd's,
and the 5 steps use torch.optim.AdamW. It writes every tensor under the golden names.

--bug NAME plants one classic porting mistake, to show that the golden set catches it:
  rope-interleaved   pair dims (2i, 2i+1) instead of (i, i + Dh/2) (the GPT-NeoX/GPT-J mix-up)
  latent-positions   give the latents the other rule's ids ("after" p+1+j for a "behind" set, and vice versa)
  coprocessor-is-decoder  run the coprocessor with the decoder's weights
  no-final-norm      read the latents before the coprocessor's final RMSNorm
  packed-arange      run the packed decoder pass at ids 0..S-1 (no explicit position ids)
  gqa-tiled          grouped-query attention with the key/value heads tiled [a, b, a, b] instead of
                     repeated in place [a, a, b, b] (only the grouped-query set, tiny_data/golden/gqa)
  rope-float32       compute the RoPE angles in float32 (as Hugging Face does): a float64 port then passes
                     the float32 tier only
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

BUGS = ("rope-interleaved", "latent-positions", "coprocessor-is-decoder", "no-final-norm", "packed-arange",
        "gqa-tiled", "rope-float32")
LATENT_POSITIONS = ("behind", "after")


# ---------------------------------------------------------------------------------------------
# A plain Llama (Hugging Face conventions): weights are a dict of HF names -> tensors
def rms_norm(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta, bug=None):
    # x [B, H, S, Dh], pos int [B, S] -> x rotated; dim i pairs with dim i + Dh/2
    dh, angles = x.shape[-1], torch.float32 if bug == "rope-float32" else torch.float64
    inv_freq = theta ** (-torch.arange(0, dh, 2, dtype=angles) / dh)            # [Dh/2]
    ang = pos.to(angles)[..., None] * inv_freq                                 # [B, S, Dh/2]
    if bug == "rope-interleaved":
        cos, sin = ang.cos()[:, None].to(x.dtype), ang.sin()[:, None].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    ang = torch.cat([ang, ang], -1)[:, None]                                   # [B, 1, S, Dh]
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * ang.sin().to(x.dtype)


def repeat_kv(x, rep, bug=None):
    # grouped-query attention: [B, Hkv, S, Dh] -> [B, Hkv*rep, S, Dh], query head i reads kv head i // rep
    if bug == "gqa-tiled":
        return x.repeat(1, rep, 1, 1)                                          # kv heads [a, b, a, b]: wrong
    return x.repeat_interleave(rep, dim=1)                                     # [a, a, b, b]


def llama(w, x, pos, may_attend, cfg, past=None, final_norm=True, bug=None):
    """Embeddings x [B, S, D] -> hidden states [B, S, D] (after model.norm), and per layer the
    new keys (after RoPE) and values [B, Hkv, S, Dh] (Hkv = n_kv_heads, or H without one).
    past: per layer (k, v) [B, Hkv, Tc, Dh] placed before the new slots; may_attend bool [B, S, Tc + S]."""
    B, S, D = x.shape
    H, eps = cfg["n_heads"], cfg["norm_eps"]
    Hkv = cfg.get("n_kv_heads") or H
    dh = D // H
    split = lambda t, heads: t.view(B, S, heads, dh).transpose(1, 2)           # [B, heads, S, Dh]
    bias = torch.zeros(may_attend.shape, dtype=x.dtype).masked_fill(~may_attend, -math.inf)[:, None]
    new_kv = []
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rope(split(h @ w[p + "self_attn.q_proj.weight"].T, H), pos, cfg["rope_theta"], bug)
        k = rope(split(h @ w[p + "self_attn.k_proj.weight"].T, Hkv), pos, cfg["rope_theta"], bug)
        v = split(h @ w[p + "self_attn.v_proj.weight"].T, Hkv)
        new_kv.append((k, v))
        if past is not None:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        k, v = repeat_kv(k, H // Hkv, bug), repeat_kv(v, H // Hkv, bug)          # [B, H, Tc + S, Dh]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, -1) @ v
        x = x + att.transpose(1, 2).reshape(B, S, D) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return (rms_norm(x, w["model.norm.weight"], eps) if final_norm else x), new_kv


# ---------------------------------------------------------------------------------------------
# The trace layout, written out element by element
def trace_masks(trace_positions, T, n_latents, n_ahead, latent_positions):
    """(packed positions int [B, S], packed mask bool [B, S, S], coprocessor positions [B, K*N_L],
    coprocessor mask bool [B, K*N_L, T + K*N_L], read-out slots [K*N_A]).

    latent_positions: "behind" gives latent j the id max(0, p-N_L+1+j), "after" p+1+j; ahead token
    x_{p+1+a} keeps its own id p+1+a."""
    B, K = trace_positions.shape
    G = n_latents + n_ahead - 1
    S = T + K * G
    pos = np.zeros((B, S), np.int64)
    mask = np.zeros((B, S, S), bool)
    cpos = np.zeros((B, K * n_latents), np.int64)
    cmask = np.zeros((B, K * n_latents, T + K * n_latents), bool)
    for b in range(B):
        for t in range(T):
            pos[b, t] = t
            mask[b, t, :t + 1] = True                          # originals: causal
        for k in range(K):
            p = int(trace_positions[b, k])
            for j in range(G):                                 # latents j < N_L, then ahead tokens
                s = T + k * G + j
                if j < n_latents:
                    pos[b, s] = p + 1 + j if latent_positions == "after" else max(0, p - n_latents + 1 + j)
                else:
                    pos[b, s] = p + 1 + j - n_latents          # ahead x_{p+1+a} at its own id p+1+a
                mask[b, s, :p + 1] = True                      # x_0..x_p
                mask[b, s, T + k * G:s + 1] = True             # own group, causally
            for j in range(n_latents):
                s = k * n_latents + j
                cpos[b, s] = pos[b, T + k * G + j]             # the same ids in the coprocessor
                cmask[b, s, :p + 1] = True                     # the decoder's cache of x_0..x_p
                cmask[b, s, T + k * n_latents:T + s + 1] = True
    readout = np.array([T + k * G + n_latents - 1 + j for k in range(K) for j in range(n_ahead)])
    return pos, mask, cpos, cmask, readout


# ---------------------------------------------------------------------------------------------
# The training loss
def training_loss(dec, cop, soft, tokens, trace_positions, cfg, bug=None):
    """loss [], and a dict of intermediate tensors (latents, ahead logits, nll, ...)."""
    B, T = tokens.shape
    K = trace_positions.shape[1]
    NL, NA, D = cfg["n_latents"], cfg["n_ahead"], cfg["d_model"]
    E = dec["model.embed_tokens.weight"]
    rule = cfg["latent_positions"]
    if bug == "latent-positions":
        rule = LATENT_POSITIONS[1 - LATENT_POSITIONS.index(rule)]
    pos, mask, cpos, cmask, readout = trace_masks(trace_positions.numpy(), T, NL, NA, rule)
    if bug == "packed-arange":
        pos = np.broadcast_to(np.arange(pos.shape[1]), pos.shape).copy()
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    with torch.no_grad():                                       # the decoder is frozen
        h, cache = llama(dec, E[tokens], torch.arange(T).expand(B, T), causal, cfg)
    soft_in = soft.expand(B, K, NL, D).reshape(B, K * NL, D)
    z, _ = llama(dec if bug == "coprocessor-is-decoder" else cop, soft_in, torch.from_numpy(cpos),
                 torch.from_numpy(cmask), cfg, past=cache, final_norm=bug != "no-final-norm", bug=bug)
    z = z.view(B, K, NL, D)
    offsets = trace_positions[..., None] + 1 + torch.arange(NA)                # [B, K, N_A]
    targets = torch.gather(tokens[:, None, :].expand(B, K, T), 2, offsets)     # x_{p+1..p+N_A}
    groups = torch.cat([z, E[targets[..., :-1]]], 2).view(B, -1, D)            # [B, K*G, D]
    h_all, _ = llama(dec, torch.cat([E[tokens], groups], 1), torch.from_numpy(pos),
                     torch.from_numpy(mask), cfg, bug=bug)                     # [B, S, D]
    logits = (h_all[:, torch.from_numpy(readout)] @ E.T).view(B, K, NA, -1)    # [B, K, N_A, V]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.flatten(),
                                            reduction="none").view(B, K, NA)
    out = {"baseline.logits": h @ E.T, "decoder_cache.k": torch.stack([k for k, _ in cache]),
           "decoder_cache.v": torch.stack([v for _, v in cache]),
           "packed.position_ids": pos, "packed.mask": mask, "latents": z, "ahead.targets": targets,
           "ahead.logits": logits, "trace_loss": nll.mean(-1)}
    return nll.mean(), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("golden", help="one golden set (manifest.json, tensors.npz): tiny_data/golden/default")
    ap.add_argument("out", help="where to write the port's tensors (.npz)")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--bug", choices=BUGS, help="plant one porting mistake (see the docstring)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    manifest = json.loads((Path(args.golden) / "manifest.json").read_text())
    c = manifest["config"]
    cfg = {**c["model"], "n_latents": c["n_latents"], "n_ahead": c["n_ahead"], "latent_positions": c.get(
        "latent_positions")}
    if cfg["latent_positions"] not in LATENT_POSITIONS or c.get("ahead_positions") != "original":
        ap.error(f"config.latent_positions {cfg['latent_positions']!r} / ahead_positions "
                 f"{c.get('ahead_positions')!r}: this port computes {LATENT_POSITIONS} / 'original'")
    with np.load(Path(args.golden) / "tensors.npz", allow_pickle=False) as z:
        g = {n: z[n] for n in z.files}
    dec = {n[len("decoder."):]: torch.tensor(a, dtype=dtype) for n, a in g.items() if n.startswith("decoder.")}
    cop = {n[len("coprocessor."):]: torch.tensor(a, dtype=dtype, requires_grad=True)
           for n, a in g.items() if n.startswith("coprocessor.")}
    soft = torch.tensor(g["soft_tokens"], dtype=dtype, requires_grad=True)
    tokens, trace_positions = torch.from_numpy(g["tokens"]), torch.from_numpy(g["trace_positions"])
    names = list(cop) + ["soft_tokens"]
    params = list(cop.values()) + [soft]

    result = {"tokens": tokens, "trace_positions": trace_positions, "soft_tokens": soft,
              **{"decoder." + n: w for n, w in dec.items()}, **{"coprocessor." + n: w for n, w in cop.items()}}
    result = {n: t.detach().clone() for n, t in result.items()}      # echo the inputs as loaded
    a = manifest["adam"]
    opt = torch.optim.AdamW(params, lr=a["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"],
                            weight_decay=a["weight_decay"])
    losses = []
    for step in range(a["steps"]):
        opt.zero_grad()
        loss, out = training_loss(dec, cop, soft, tokens, trace_positions, cfg, args.bug)
        loss.backward()
        if step == 0:
            result.update(out)
            result["loss"] = loss
            grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                     for n, p in zip(names, params)}
            result.update({"grad." + ("" if n == "soft_tokens" else "coprocessor.") + n: gr
                           for n, gr in grads.items()})
        losses.append(loss.item())
        opt.step()
    result["adam.losses"] = np.array(losses)
    arrays = {n: (t.detach().numpy() if torch.is_tensor(t) else np.asarray(t)) for n, t in result.items()}
    np.savez(args.out, **arrays)
    print(f"wrote {len(arrays)} tensors to {args.out} ({args.dtype}{', bug ' + args.bug if args.bug else ''}); "
          f"loss {losses[0]:.6f}")


if __name__ == "__main__":
    main()
