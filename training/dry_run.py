"""``decmem train --dry-run``: check a run config against its layout and data, print what a step costs, then exit.

Nothing here starts training, a process group or a device context: the model is
built on the ``meta`` device (a paper-size model costs nothing), the data check
decodes one sample of the first shard, and the memory estimate is arithmetic.

Semantics (the trainer's, DESIGN §2.4, §4, §5):
  world ranks form a dp x cp grid, dp = world // cp, rank r = (r // cp, r % cp);
  one optimizer step consumes dp * grad_accum * data.batch_size samples of
  data.clip_frames latent frames; the cp ranks of one group share a sample and
  each encodes frames shard_range(bank_frames, cp, cp_rank) of its memory bank;
  the query stream (data.target_chunks chunks of model.chunk_frames frames) is
  replicated on every rank of the group.
"""
from __future__ import annotations

import dataclasses

import torch

from decmem.data_pipeline import storage
from decmem.model.factory import build_model
from decmem.training.context_parallel import Layout, shard_range
from decmem.training.validate import (
    bank_frames,
    check_data,
    local_bank_frames,
    resolve_device_precision,
    target_chunks,
    validate,
)

GiB = float(1 << 30)
FLEX_PAIR_BYTES = 21      # sparse_backend=flex: bytes kept per (query block, bank block) pair (see estimate_memory)
FLEX_CPU_SCORES = 9       # ... and fp32 score-sized buffers of FlexAttention's CPU reference alive at once (its
                          # backward's peak, measured with bench.common.LiveTensorPeak: 9.1-11 incl. bool masks)


#################################################################################
#                                    Helpers                                    #
#################################################################################

def format_bytes(n: float) -> str:
    """Bytes in binary units: '512 B', '1.50 KiB', '12.3 MiB', '4.25 GiB', '1.10 TiB'."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def _fmt_count(n: float) -> str:
    """1234 -> '1.23 k', 4.9e10 -> '49.4 G'."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def _fmt_groups(groups: list[list[int]], limit: int = 8) -> str:
    shown = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups[:limit])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


#################################################################################
#                                   Parameters                                  #
#################################################################################

def _build_meta_model(cfg):
    try:
        with torch.device("meta"):
            return build_model(cfg.model)       # a Wan shape from model.wan.transformer: no download needed
    except Exception:  # an init op without a meta kernel: a real (CPU) model, which is only slower
        return build_model(cfg.model)


def _param_stats(cfg) -> tuple[int, int]:
    """(all parameters, parameters of the largest DiT block)."""
    model = _build_meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in b.parameters()) for b in model.blocks), default=0)
    return total, largest


def count_parameters(cfg) -> int:
    """Parameters of the model cfg.model describes, counted on the meta device (no memory, no init cost)."""
    return _param_stats(cfg)[0]


#################################################################################
#                                Memory estimate                                #
#################################################################################

def estimate_memory(cfg, world: int, frame_hw: tuple[int, int]) -> dict:
    """Bytes per rank of one training micro-step, by component, for latent frames of ``frame_hw``.

    Keys (bytes per rank): params, grads, optimizer, ema (the ZeRO-partitioned model
    states), params_gathered (ZeRO-3's unpartitioned working copy of the largest
    block and the prefetched next one, with the full gradient of one), bank_kv
    (memory bank of every layer), activations (what autograd keeps for backward:
    memory_stream + query_stream + head (the final layer), or block inputs + head +
    one recomputed block with activation checkpointing), workspace (one block's transient backward buffers),
    cp_buffers (halo and partial-output collectives, cp > 1), total. Also the
    inputs: layout, precision, tokens_per_frame, bank frames, token counts.

    Upper bound for a step: every target chunk is assumed to read the whole local
    bank (the last chunk ends at the clip's end). The activation formulas follow
    this code base's DiT block and attention kernels (tests compare them with the
    bytes autograd actually saves).
    """
    m, att, d, t = cfg.model, cfg.model.attention, cfg.data, cfg.train
    layout = Layout.make(world, t.cp, 0)
    device, precision, _ = resolve_device_precision(t)
    p = m.patch_size
    h, w = frame_hw
    Nf = (h // p) * (w // p)                          # tokens per latent frame
    D, depth, H = m.dim, m.depth, m.n_heads
    Dp = D + H                                        # fused kernels pad each head by one column: H * (d + 1)
    W, C, Bs, batch = att.window, m.chunk_frames, att.block_size, d.batch_size
    n_params, largest_block = _param_stats(cfg)

    # ---- model states (DeepSpeed ZeRO: stage >= 1 splits optimizer, >= 2 grads, 3 params, over all ranks)
    if precision == "bf16":
        pb, gb, ob = 2, 2, 12                         # bf16 param + bf16 grad + fp32 master, Adam m, v
    else:
        pb, gb, ob = 4, 4, 8                          # fp32 param + grad + Adam m, v
    z = t.zero_stage
    params = n_params * pb / (world if z >= 3 else 1)
    grads = n_params * gb / (world if z >= 2 else 1)
    optimizer = n_params * ob / (world if z >= 1 else 1)
    ema = n_params * 4 / (world if z >= 3 else 1) if t.ema > 0 else 0   # fp32 EMA of this rank's partition
    # ZeRO-3 gathers each block's full parameters for its forward/backward and prefetches the next one;
    # in backward the block's full gradient exists until its reduce-scatter
    params_gathered = (2 * largest_block * pb + largest_block * gb) if z >= 3 else 0

    # ---- activations
    a = 2 if precision == "bf16" else 4               # activation element bytes (the model runs in its precision)
    f32 = 4
    Lb = local_bank_frames(cfg)                       # bank frames this rank encodes
    chunks = target_chunks(cfg)
    # train.cp_queries=sharded: each rank runs its own chunks, as many slots as the busiest rank (an idle slot
    # reruns a chunk with weight 0); replicated: every rank runs every chunk
    sharded = t.cp_queries == "sharded" and layout.cp > 1
    # cp_block_read=ship: the blocks' holders attend the chunks' query blocks. Worst case, one rank holds every
    # selected block of the slot's cp chunks and keeps their gathered K/V, received queries and outputs.
    ship = sharded and t.cp_block_read == "ship"
    local_chunks = -(-chunks // layout.cp) if sharded else chunks
    Tm = Lb * Nf * batch                              # memory-stream tokens per rank
    Tq = C * Nf * batch                               # query-stream tokens per chunk (replicated over cp)
    math_kernel = att.backend == "math"               # explicit softmax keeps probabilities; fused kernels do not

    # Per token per layer, elements autograd keeps for one DiT block (model/dit.py DiTBlock._run), common to
    # both streams:
    #   LayerNorm 1 input x, its modulate() input and output, the gated residual's attention output,
    #   LayerNorm 2 input, its modulate() output                                     ~ 6 D
    #   inputs of the Linear layers: qkv (h), proj (attention output), MLP fc1 (h)     3 D
    #   MLP hidden before and after GELU (fc2 input)                                   2 * mlp_ratio * D
    # (the qkv output itself is held by the bank / the heads, counted below; LayerNorm mean/rstd are ~1/D)
    hidden = int(D * m.mlp_ratio)
    block = 9 * D + 2 * hidden
    # Memory stream attention (DecMemAttention.encode_memory): one fused kernel call per frame over its
    # W-frame causal window. unfold() materialises the window K/V, and the kernel keeps q, out and the
    # window K/V padded to d+1 columns per head:  (2 + 2 W) * (D + H) per token (math kernel: + 3 H W N_f
    # softmax elements, see the dense note below).
    mem_attn = (2 + 2 * W) * Dp + (3 * H * W * Nf if math_kernel else 0)
    mem_layer = Tm * (block + mem_attn) * a
    memory_stream = depth * mem_layer

    # Query stream attention (DecMemAttention.forward), per chunk token unless noted:
    #   chunk branch: q, k, v, out (padded)                          4 (D + H)
    #   ALM window: q, out + the window's K/V, (W-1) frames per chunk 2 (D + H) + 2 (W-1) N_f (D + H) / chunk
    #   decmem SGM: q, out + each query block's own gathered top_k blocks of K/V (B tokens each), so
    #     2 top_k (D + H) per query token, + the retrieval bias and mask (2 H top_k)
    #   dense: every bank token's K/V padded, per chunk: 2 L_b N_f (D + H), which grows with the bank; the
    #     math kernel also keeps chunk_tokens x bank_tokens scores per head three times (exp, probabilities,
    #     the matmul's copy): 3 H C N_f L_b N_f per chunk (fused kernels recompute them in backward)
    #   gated merge: SGM/ALM outputs and gate products ~ 3 D (1 D for one joint merge)
    #   sparse_backend=flex (one process or replicated cp; sharded cp gathers either way): the selected blocks are
    #     read in place from the bank's K/V (already counted in bank_kv), so the SGM read keeps q, out (unpadded)
    #     and the lse (H fp32) per token, plus per chunk the selection as tables over (query block, bank block):
    #     the fp32 bias table, its bool mask and the BlockMask's int32 index lists both ways, ~21 bytes a pair
    # cp > 1 adds the fp32 partial-output all-reduce of the bank read (2 D fp32 per token).
    s = att.strategy
    q_tok = block + 4 * Dp                            # per query token: block + chunk branch
    q_chunk = 0                                       # per chunk, independent of its token count
    flex = att.sparse_backend == "flex" and s in ("decmem", "fov_frames") and not sharded
    flex_read = 2 * D + H * f32 / a                   # flex: q, out, lse per query token
    flex_tables = batch * H * (C * Nf // Bs) * (Lb * Nf // Bs) * FLEX_PAIR_BYTES / a
    if s in ("dense", "dense_decay"):
        q_tok += 2 * Dp + D
        q_chunk += 2 * Lb * Nf * batch * Dp
        if math_kernel:
            q_tok += 3 * H * (Lb * Nf + C * Nf)
    else:
        q_tok += 2 * Dp                               # window q, out
        q_chunk += 2 * (W - 1) * Nf * batch * Dp      # the window's K/V
        if s == "decmem":
            if flex:
                q_tok += flex_read
                q_chunk += flex_tables
            else:
                served = 2 * att.top_k * Dp + 2 * H * att.top_k  # gathered K/V of the query block's blocks, bias, mask
                q_tok += 2 * Dp + (layout.cp * (served + 2 * Dp) if ship else served)
            q_tok += 3 * D if att.merge == "gate" else D  # gated products keep their branch outputs
            if att.coarse:
                q_tok += D                            # the coarse output, copied to each token of its block
        elif s == "fov_frames":                       # the read frames' K/V, gathered (or flex's tables)
            q_tok += D + (flex_read if flex else 2 * Dp)
            q_chunk += flex_tables if flex else 2 * att.fov_frames * Nf * batch * Dp * (layout.cp if ship else 1)
        else:                                         # window: ALM only
            q_tok += D
        if math_kernel:
            q_tok += 3 * H * ((W - 1) * Nf + C * Nf + (att.top_k * Bs if s == "decmem" and not flex else 0))
    # (sharded: no merge; the fetched blocks and window are held like the local ones, counted above)
    q_layer = (Tq * q_tok + q_chunk) * a + (Tq * 2 * D * f32 if layout.cp > 1 and s != "window" and not sharded else 0)
    query_stream = depth * local_chunks * q_layer

    # outside the blocks: the final layer keeps its LayerNorm input, modulate() output and Linear input per
    # query token (the embeddings keep nothing token-sized: their adds save nothing, convs keep their input)
    head = local_chunks * Tq * 3 * D * a
    one_block = max(mem_layer, q_layer)
    if t.activation_checkpointing:
        # only each block's input is kept (both streams); backward recomputes one block at a time
        inputs = depth * (Tm + local_chunks * Tq) * D * a
        activations = inputs + head + one_block
    else:
        inputs = 0
        activations = memory_stream + query_stream + head
    workspace = one_block                             # gradients of the block being back-propagated
    if flex and device != "cuda":
        # off CUDA, FlexAttention's reference implementation scores the whole local bank: FLEX_CPU_SCORES
        # fp32 [chunk tokens x bank tokens] buffers per head live at once in its forward and backward (not kept)
        workspace = max(workspace, FLEX_CPU_SCORES * batch * H * C * Nf * Lb * Nf * f32)

    # ---- memory bank: per layer, K and V of every local bank token, plus one pooled key and value per block
    # of B tokens. Without positions inside attention K/V are views of the fused qkv projection's output,
    # so that whole [tokens, 3 D] buffer stays alive (q included); with PRoPE / RoPE they are transformed
    # copies (2 D) and the projection's output is freed.
    kv = 2 if (m.camera == "prope" or m.position == "rope") else 3
    bank_kv = depth * Tm * (kv * D + 2 * D / Bs) * a

    # ---- cp collectives: each layer all-gathers the W-1 halo frames' K/V of every rank of the group
    cp_buffers = depth * layout.cp * 2 * (W - 1) * Nf * batch * D * a if layout.cp > 1 else 0

    out = {
        "params": params, "grads": grads, "optimizer": optimizer, "ema": ema, "params_gathered": params_gathered,
        "bank_kv": bank_kv, "activations": activations, "workspace": workspace, "cp_buffers": cp_buffers,
    }
    out = {k: int(round(v)) for k, v in out.items()}
    out["total"] = sum(out.values())
    out.update(
        memory_stream=int(memory_stream), query_stream=int(query_stream), block_inputs=int(inputs), head=int(head),
        world=world, dp=layout.dp, cp=layout.cp, precision=precision, device=device, n_params=n_params,
        tokens_per_frame=Nf, bank_frames=bank_frames(cfg), local_bank_frames=Lb, target_chunks=chunks,
        memory_tokens=Tm, query_tokens=local_chunks * Tq, local_target_chunks=local_chunks,
        cp_queries="sharded" if sharded else "replicated", cp_block_read=t.cp_block_read if sharded else None,
    )
    return out


#################################################################################
#                                  Layouts Table                                #
#################################################################################

TABLE_CPS = (1, 2, 4, 8)
GPU_80GB = 80 * GiB                                   # the 80 GB GPUs the paper-scale configs plan for


def layout_table(cfg, world: int, frame_hw: tuple[int, int], device_memory: float = GPU_80GB) -> list[dict]:
    """Per-rank memory of this config under cp = 1, 2, 4, 8 (world: the given one if cp divides it, else cp)."""
    rows = []
    for cp in TABLE_CPS:
        w = world if world % cp == 0 else cp
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cp=cp))
        total = estimate_memory(c, w, frame_hw)["total"]
        rows.append({"cp": cp, "world": w, "dp": w // cp, "total": total, "fits": total <= device_memory})
    return rows


MODEL_STATE_KEYS = ("params", "grads", "optimizer", "ema", "params_gathered")
ACTIVATION_KEYS = ("bank_kv", "activations", "workspace", "cp_buffers")


#################################################################################
#                                   The report                                  #
#################################################################################

def run_dry_run(cfg, world: int, log=print, frame_hw: tuple[int, int] | None = None,
                device_memory: int | None = None) -> dict:
    """Validate, count parameters, check the data, estimate memory; print a report and return it as a dict.

    frame_hw: latent (h, w) to estimate with instead of opening the data (for data not reachable from here).
    device_memory: bytes per device to compare the estimate with (default: this machine's GPU, if any).
    """
    m, d, t = cfg.model, cfg.data, cfg.train
    warnings = validate(cfg, world)
    layout = Layout.make(world, t.cp, 0)
    device, precision, how = resolve_device_precision(t)
    n_params = count_parameters(cfg)
    unreachable = None
    if frame_hw is None and storage.is_remote(d.data):
        try:
            storage.exists(d.data.rstrip("/") + "/manifest.json")
        except Exception as e:  # no credentials or no route from here (a login node, a laptop): say so, go on
            unreachable = f"{type(e).__name__}: {e}"
            frame_hw = (32, 32)
    if frame_hw is None:
        data = check_data(cfg)
        if data["shards"] < layout.dp:
            raise ValueError(f"data.data: {data['shards']} shards cannot feed dp={layout.dp} data-parallel ranks "
                             f"(world {world} / train.cp {t.cp}); each needs at least one shard: preprocess with a "
                             "smaller --shard-bytes or use fewer processes")
        frame_hw = data["frame_hw"]
    else:
        data = None
    mem = estimate_memory(cfg, world, frame_hw)
    Nf = mem["tokens_per_frame"]
    samples = layout.dp * t.grad_accum * d.batch_size
    tokens = samples * d.clip_frames * Nf
    target_tokens = samples * mem["target_chunks"] * m.chunk_frames * Nf
    shards = [shard_range(bank_frames(cfg), layout.cp, r) for r in range(layout.cp)] \
        if bank_frames(cfg) >= layout.cp else []
    if device_memory is None and device == "cuda" and torch.cuda.is_available():
        device_memory = torch.cuda.get_device_properties(0).total_memory
    if device_memory and mem["total"] > device_memory:
        warnings.append(f"the estimate ({format_bytes(mem['total'])} per rank) exceeds the device's "
                        f"{format_bytes(device_memory)}: raise train.cp, set train.activation_checkpointing=true "
                        "or lower data.batch_size")

    a = m.attention
    lines = [
        f"dry run: {cfg.name} (run_dir {cfg.run_dir}) -- nothing is trained, no process group is started",
        "layout",
        f"  world {world} = dp {layout.dp} x cp {layout.cp}   (rank r -> dp_rank r // {layout.cp}, "
        f"cp_rank r % {layout.cp})",
        f"  cp groups (share one sample): {_fmt_groups(layout.cp_groups())}",
        f"  dp groups (same bank shard):  {_fmt_groups(layout.dp_groups())}",
        "device",
        f"  {device}, {precision}, DeepSpeed ZeRO-{t.zero_stage}, activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}, EMA {t.ema if t.ema else 'off'}"
        + (f"   ({how})" if how else ""),
        "model",
        (f"  Wan ({m.wan.pretrained or 'shape from model.wan.transformer'}): " if m.backbone == "wan" else
         f"  size {m.size}: ") + f"dim {m.dim}, depth {m.depth}, heads {m.n_heads}, patch {m.patch_size}, "
        f"latent channels {m.latent_channels}, chunk {m.chunk_frames} frames",
        f"  parameters {n_params:,} ({n_params / 1e6:.1f} M)",
        f"  attention {a.strategy}: block {a.block_size} tokens, top_k {a.top_k}, window {a.window} frames, "
        f"merge {a.merge}, selected blocks read by {a.sparse_backend}",
        "per optimizer step",
        f"  samples {samples} = dp {layout.dp} x grad_accum {t.grad_accum} x batch_size {d.batch_size}",
        f"  tokens {tokens:,} = {samples} samples x {d.clip_frames} frames x {Nf} tokens/frame "
        f"({frame_hw[0]}x{frame_hw[1]} latents / patch {m.patch_size})",
        f"  target tokens (the loss) {target_tokens:,} = {samples} x {mem['target_chunks']} chunks x "
        f"{m.chunk_frames} frames x {Nf}",
        f"  {t.steps:,} steps -> {t.steps * samples:,} samples, {_fmt_count(t.steps * tokens)} tokens",
        "memory bank",
        f"  up to {bank_frames(cfg)} frames per sample (clip {d.clip_frames} - chunk {m.chunk_frames}; first target "
        f"chunk at >= {d.min_context})",
        f"  per cp rank: {mem['local_bank_frames']} frames max"
        + (f", shards {' '.join(f'[{lo},{hi})' for lo, hi in shards)}" if layout.cp > 1 and shards else "")
        + f"  = {mem['memory_tokens']:,} memory-stream tokens; query stream {mem['query_tokens']:,} tokens "
        + (f"({mem['local_target_chunks']} of {mem['target_chunks']} chunks: train.cp_queries=sharded, "
           f"blocks read by {mem['cp_block_read']})"
           if mem["cp_queries"] == "sharded" else "(replicated)"),
        f"memory estimate per rank ({precision}, micro-batch {d.batch_size}, worst case: the whole bank read)",
    ]
    names = {
        "params": f"parameters (ZeRO-{t.zero_stage} share)", "grads": "gradients (share)",
        "optimizer": "optimizer (share)" + (": fp32 master + Adam m, v" if precision == "bf16" else ": Adam m, v"),
        "ema": "EMA weights (share)", "params_gathered": "gathered block params + grads (ZeRO-3)",
        "bank_kv": "memory bank K/V (all layers)", "activations": "activations kept for backward",
        "workspace": "backward workspace (one block)", "cp_buffers": "cp collectives (halo)",
    }
    for k in MODEL_STATE_KEYS + ACTIVATION_KEYS:
        if mem[k] or k in ("params", "activations"):
            small = f"  ({format_bytes(mem[k])})" if mem[k] < 0.1 * GiB else ""
            lines.append(f"  {names[k]:<44} {mem[k] / GiB:9.3f} GiB{small}")
            if k == "activations":
                detail = (f"block inputs {format_bytes(mem['block_inputs'])} + one recomputed block "
                          f"{format_bytes(mem['activations'] - mem['block_inputs'] - mem['head'])}"
                          if t.activation_checkpointing else
                          f"memory stream {format_bytes(mem['memory_stream'])}, query stream "
                          f"{format_bytes(mem['query_stream'])}")
                lines.append(f"    ({detail})")
    small = f"  ({format_bytes(mem['total'])})" if mem["total"] < 0.1 * GiB else ""
    lines.append(f"  {'total':<44} {mem['total'] / GiB:9.3f} GiB{small}" +
                 (f"  (device: {device_memory / GiB:.1f} GiB)" if device_memory else ""))
    table = layout_table(cfg, world, frame_hw)
    lines.append(f"layouts on {GPU_80GB / GiB:.0f} GiB GPUs (same config, train.cp varied; world = {world} where cp "
                 "divides it, else cp)")
    lines.append(f"  {'cp':>3} {'world':>6} {'dp':>4} {'per-rank total':>15}  fits")
    for row in table:
        lines.append(f"  {row['cp']:>3} {row['world']:>6} {row['dp']:>4} {row['total'] / GiB:11.2f} GiB  "
                     f"{'yes' if row['fits'] else 'NO'}")
    lines.append("data")
    if unreachable:
        lines.append(f"  NOT CHECKED: {d.data} cannot be reached from this machine ({unreachable})")
        lines.append(f"  the estimate above assumes {frame_hw[0]}x{frame_hw[1]} latent frames; run the dry run where "
                     "the data is readable to check it")
        warnings = [*warnings, f"data.data={d.data!r} was not checked (unreachable from here)"]
    elif data is None:
        lines.append(f"  not opened; estimated for {frame_hw[0]}x{frame_hw[1]} latent frames")
    else:
        lines.append(f"  {data['shards']} shards from {d.data}")
        lines.append(f"  first shard {data['first_shard']}: sample {data['key']} has {data['sample_frames']} frames of "
                     f"{data['channels']}x{data['frame_hw'][0]}x{data['frame_hw'][1]} latents -- OK for this model")
    for wmsg in warnings:
        lines.append(f"warning: {wmsg}")
    for line in lines:
        log(line)
    return {
        "layout": {"world": world, "dp": layout.dp, "cp": layout.cp, "cp_groups": layout.cp_groups(),
                   "dp_groups": layout.dp_groups()},
        "device": device, "precision": precision, "params": n_params,
        "samples_per_step": samples, "tokens_per_step": tokens, "target_tokens_per_step": target_tokens,
        "tokens_per_frame": Nf, "bank_frames": bank_frames(cfg), "bank_frames_per_rank": mem["local_bank_frames"],
        "bank_shards": shards, "memory": mem, "layouts": table, "data": data, "warnings": warnings, "report": "\n".join(lines),
    }
