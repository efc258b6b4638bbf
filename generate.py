"""
Generation with the model's static KV cache (gpt-fast style: the cache lives in model.py, the decoding
here): a left-padded batched prefill, then one fixed-shape decode step per token (compilable, CUDA-graph
capturable), sampling with one generator per row, stop ids and stop strings. On-policy sampling, the demo's
exact match, eval_gen.py and sample.py all generate through `generate`; every model computation goes through
the model's forward (so FSDP2's hooks gather what it needs), never embed/trunk/lm_head alone.
"""
import torch


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k=None, top_p=None,
             seed=None, row_seeds=None, stop_ids=None, pad_id=None, stop_fn=None, compile: bool = False):
    """Batched generation over prompts (lists of ids) of different lengths. Returns the new ids of each
    prompt, the stop token included when hit and nothing after it.
    seed: one generator for the whole batch. row_seeds: one seed per prompt, each row drawing from its own
      generator, so a row's sample does not depend on which rows share its batch or how they are padded
      (exact up to logits rounding). Greedy (temperature 0) needs neither.
    stop_ids: default the model's EOS. pad_id: what ends a row's output after its stop (default EOS).
    stop_fn(row, new_ids) -> bool: called on the host after every step for each running row (e.g. "the
      decoded text holds a stop string"); True ends that row there, like a stop id.
    compile=True: torch.compile the one-token step (mode="reduce-overhead", i.e. CUDA graphs, on CUDA);
      the cache and its tables are kept between calls (model.clear_cache() frees them)."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"generate: {len(row_seeds)} row_seeds for {len(prompts)} prompts")
    dev = model.embed_tokens.weight.device
    stop = torch.tensor(stop_ids if stop_ids is not None else [model.args.eos_token_id], device=dev)
    pad = pad_id if pad_id is not None else model.args.eos_token_id
    if temperature <= 0:
        draw = lambda logits: logits.argmax(-1)
    else:
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None and row_seeds is None else None
        row_gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in row_seeds] if row_seeds is not None else None
        draw = lambda logits: sample(logits, temperature, top_k, top_p, gen, row_gens)
    # inference_mode trims per-op overhead; FSDP2 must not allocate its gather buffers under it.
    with torch.no_grad() if hasattr(model, "reshard") else torch.inference_mode():
        try:
            return _decode(model, prompts, max_new_tokens, draw, stop, pad, stop_fn, compile)
        finally:
            if not compile:
                model.clear_cache()


def left_pad(prompts, pad: int, device):
    """ids [B,P] left-padded with `pad`; valid [B,P] (False = a padding slot) or None when no row is
    padded (then the prefill needs no mask); RoPE positions [B,P] counting real tokens only."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    valid = torch.ones(B, P, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, device=device)
        valid[b, :P - len(p)] = False
    if all(len(p) == P for p in prompts):
        return ids, None, torch.arange(P, device=device)[None].expand(B, P)
    return ids, valid, (valid.long().cumsum(-1) - 1).clamp(min=0)


def _decode(model, prompts, n_new, draw, stop, pad, stop_fn, compile):
    """Prefill, then up to n_new tokens, each row stopping at its first stop id (or stop_fn)."""
    dev = stop.device
    ids, valid, pos = left_pad(prompts, pad, dev)
    B, P = ids.shape
    # Compiled: round the cache up so nearby prompt lengths share one compiled step / CUDA graph.
    S = model.setup_cache(B, -(-(P + n_new) // 256) * 256 if compile else P + n_new, valid, keep=compile)
    slots = torch.arange(S, device=dev)
    step = _compiled_step(dev.type) if compile else _step
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out, alive, hist = [], [], [[] for _ in range(B)]
    logits = model(ids, position_ids=pos, input_pos=slots[:P])[:, -1]
    next_pos = pos[:, -1:] + 1
    for i in range(n_new):
        tok = torch.where(done, torch.full((B,), pad, device=dev), draw(logits.float()))
        out.append(tok)
        alive.append(~done)
        done = done | torch.isin(tok, stop)
        if stop_fn is not None:   # one host sync per step
            hit = []
            for b, (t, d, a) in enumerate(zip(tok.tolist(), done.tolist(), alive[-1].tolist())):
                if a:
                    hist[b].append(t)
                hit.append(a and not d and bool(stop_fn(b, hist[b])))
            done = done | torch.tensor(hit, device=dev)
        if bool(done.all()) or i == n_new - 1:
            break
        logits = step(model, tok[:, None], next_pos, slots[P + i:P + i + 1])
        if compile:   # under CUDA graphs the output buffer is overwritten by the next replay
            logits = logits.clone()
        next_pos = next_pos + 1
    lengths = torch.stack(alive, 1).sum(1).tolist()
    return [row[:n] for row, n in zip(torch.stack(out, 1).tolist(), lengths)]


def _step(model, tok, position_ids, input_pos):
    """One decode step through forward: fixed shapes ([B,1] token and positions, [1] slot), which
    is what makes it compilable and CUDA-graph capturable."""
    return model(tok, position_ids=position_ids, input_pos=input_pos)[:, -1]


_COMPILED = {}


def _compiled_step(device_type: str):
    if device_type not in _COMPILED:   # one compiled function per device type; dynamo caches per shape
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(_step, mode=mode, fullgraph=True)
    return _COMPILED[device_type]


def sample(logits, temperature: float, top_k=None, top_p=None, generator=None, row_generators=None):
    """logits [B,V] fp32 -> token ids [B]. Greedy when temperature == 0. row_generators: one
    torch.Generator per row; row b's draw then uses only its own generator (exponential race:
    argmax p / E with E = -log U, U ~ uniform from that generator, which samples p exactly)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, descending=True, dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > top_p        # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    if row_generators is not None:
        V = probs.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=probs.device) for g in row_generators])
        return (probs / -torch.log(u)).argmax(-1)     # U = 0 -> E = inf -> never chosen
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
