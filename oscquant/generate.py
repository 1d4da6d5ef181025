"""Greedy generation whose decode steps replay a CUDA graph.

Eagerly, every OSC layer costs the host 110-250 µs of Python, allocations and two or three Triton launches for 9-112 µs
of GPU work on the H200 (docs/bench/h200_model_2026-11-30.md), so a decode step waits on the host and the 4-bit GEMMs'
speed never shows. Here the prompt runs eagerly into a static KV cache, one decode step is
captured, and each further token replays it: the step reads its token and position from device buffers and writes the
next ones back (argmax, position + 1), so the host only launches the graph. On the CPU, or with ``graph=False``, the
same steps run eagerly: the tests check that both give model.generate's tokens.
"""

from __future__ import annotations

import warnings

import torch


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id=None, graph: bool | None = None,
             check_every: int = 16, compile: bool = False) -> torch.Tensor:
    """ids [1, P] -> [1, P + new] greedy tokens, stopping after an end-of-sequence token (``eos_token_id``: an id,
    a list of ids, or None for the model's generation config). ``graph``: replay a CUDA graph for the decode steps
    (default: on a CUDA model whose cache allows it; models with sliding-window layers, such as Gemma 3, decode
    eagerly with a warning, and ``graph=True`` raises for them). ``compile``: run the decode step through torch.compile
    first (compiled_step), so that the norms, rotary embedding and other small kernels around the GEMMs are fused."""
    from transformers import StaticCache

    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"generate takes one prompt of at least one token, ids [1, P]; got shape {tuple(ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    dev = next(model.parameters()).device
    asked = graph
    graph = dev.type == "cuda" if graph is None else graph
    if graph and dev.type != "cuda":
        raise RuntimeError("a CUDA graph needs the model on a CUDA GPU; move it there, or pass graph=False")
    eos = _eos_ids(model, eos_token_id)
    ids = ids.to(dev)
    p = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
    why = _why_no_graph(cache) if graph else None
    if why and asked:
        raise ValueError(f"this model's decode step cannot be replayed from a CUDA graph: {why}; pass graph=False")
    if why:
        warnings.warn(f"oscquant.generate: the decode steps run eagerly: {why}", stacklevel=2)
        graph = False
    logits = model(ids, past_key_values=cache, cache_position=torch.arange(p, device=dev), use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)  # [1, 1], the next step's input, updated in place by each step
    pos = torch.tensor([p], device=dev)

    step_fn = compiled_step() if compile else decode_step

    def step():
        tok.copy_(step_fn(model, cache, tok, pos)[:, -1:].argmax(-1))
        pos.add_(1)

    run = step
    if graph and max_new_tokens > 1:
        # each warm-up advances the token and position: both are put back before every warm-up and the capture
        saved_tok, saved_pos = tok.clone(), pos.clone()
        run, _ = capture_graph(step, before=lambda: (tok.copy_(saved_tok), pos.copy_(saved_pos)))
    new = [tok.clone()]
    for i in range(1, max_new_tokens):
        if eos and i % check_every == 0 and _ended(new, eos):
            break
        run()
        new.append(tok.clone())
    out = torch.cat(new, dim=1)
    if eos:  # cut after the first end-of-sequence token, as model.generate stops there
        hits = torch.isin(out[0], torch.tensor(sorted(eos), device=dev)).nonzero()
        if hits.numel():
            out = out[:, :hits[0, 0] + 1]
    return torch.cat([ids, out], dim=1)


def decode_step(model, cache, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The logits of token ``tok`` [1, 1] at position ``pos`` [1] (device tensors), its keys and values written into the
    static cache at that position, with no host-side state: a CUDA graph of it replays correctly."""
    # transformers 5's static cache counts stored tokens on the device and writes at that count: set it to the
    # position, so that a replayed step writes where its token belongs
    for layer in cache.layers:
        layer.cumulative_length.copy_(pos[0])
    return model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits


def compiled_step():
    """decode_step under torch.compile. In a decode step on the H200 the GEMMs are a minority of the GPU time: the
    norms, rotary embedding, attention and elementwise kernels around them took ~0.19 of 0.29 ms a Qwen3-8B layer
    (docs/bench/h200_model_2026-11-30.md). Compiling fuses most of those; the OSC layers stay one opaque custom op each
    (oscquant::osc_linear), so their kernels are unchanged. The first call compiles (tens of seconds); later steps
    reuse it, the position being a device tensor."""
    return torch.compile(decode_step)


def capture_graph(fn, before=lambda: None, warmups: int = 2):
    """(replay, fn's output in the graph's memory): ``fn`` captured into a CUDA graph after warm-ups on a side stream
    (as torch.cuda.graph's notes ask; they also compile the kernels), ``before()`` run before each warm-up and before
    the capture, which records ``fn`` without running it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _why_no_graph(cache) -> str | None:
    """None if every layer of the static cache keeps its state on the device (plain full-attention layers), else why
    not: a sliding-window layer decides on the host, from a Python count, whether its window is full (and rolls it
    then), so a captured step would replay the state it was captured in."""
    from transformers.cache_utils import StaticLayer

    kinds = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer})
    if kinds:
        return f"its cache has {', '.join(kinds)} layers (sliding-window attention), whose fill state the host tracks"
    return None


def _eos_ids(model, eos_token_id) -> set:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def _ended(new: list, eos: set) -> bool:
    return bool(torch.isin(torch.cat(new, dim=1), torch.tensor(sorted(eos), device=new[0].device)).any())
