"""Device time of one forward pass (a decode or a mixed step), with parts switched off, to see where the time goes.

    python benchmarks/forward_variants.py --model llama-3.1-8b --load-format dummy --batch 1
    python benchmarks/forward_variants.py --smoke

The measured step is B decodes at ~--context tokens each (every prompt prefilled first), or with --mixed N,
B - N decodes plus the first chunk of N new prompts (a 2048-token bucket).

Variants (each compiled once, called --steps times back to back, blocked once):
  engine        the engine's own compiled forward program for the step's bucket (what `Engine.step` runs)
  full          the engine's forward (paged attention kernel, KV write) + argmax over the logits
  full_decode_kernel  the same with the attention op's decode kernel (what decode buckets run)
  no_attention  attention output replaced by q (k and v kept live) and no KV write: the matmul / norm / rope
                chain alone
  lm_head       the final norm + logits + argmax alone
The bytes of weights read per step over the measured time give the achieved bandwidth of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--trace", metavar="DIR", help="also write a Perfetto trace of the engine's forward program here")
    p.add_argument("--only", help="comma-separated variants to run (default: all)")
    p.add_argument("--compile-threads", type=int, default=0, help="the engine's compile threads (0: its default)")
    p.add_argument("--no-compilation-cache", action="store_true")
    p.add_argument("--mixed", type=int, default=0, metavar="N",
                   help="measure a mixed step: batch - N decodes plus the first chunk of N new prompts")
    p.add_argument("--kv-cache-memory", default="24GiB")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.engine import Engine
    from jaxinfer.model import mlp_block, apply_rope, compute_logits, dot, embed_tokens, forward, rms_norm
    from jaxinfer.attention import make_attention_fn
    from jaxinfer.sampling_params import SamplingParams

    if args.smoke:
        args.context, args.steps = 16, 3
    B, T_big = args.batch, (64 if args.smoke else 2048)
    eng = Engine(args.model, load_format=args.load_format, max_num_seqs=B, token_buckets=sorted({B, T_big}),
                 seq_buckets=[B], max_num_batched_tokens=T_big, max_model_len=args.context + 64, show_progress=False,
                 kv_cache_memory=None if args.smoke else args.kv_cache_memory, compile_threads=args.compile_threads,
                 use_compilation_cache=not args.no_compilation_cache)
    cfg, run = eng.cfg, eng.runner
    rng = np.random.default_rng(0)
    prompt = lambda: rng.integers(0, cfg.vocab_size, args.context).tolist()
    for _ in range(B - args.mixed):
        eng.add_request(prompt(), SamplingParams(max_tokens=48, ignore_eos=True))
    # Step until every prompt is in (the scheduler advances num_computed_tokens when it schedules), so the
    # next step is all decodes at ~context tokens; --mixed N then adds N new prompts to that step.
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens for r in eng.scheduler.running):
        eng.step()
    for _ in range(args.mixed):
        eng.add_request(prompt(), SamplingParams(max_tokens=48, ignore_eos=True))
    batch = eng.scheduler.schedule()
    step_inp, _, bucket, _ = run.prepare(batch)
    print(f"measured step: {len(batch)} rows, {batch.num_tokens} tokens, bucket {bucket}", flush=True)
    from jaxinfer.runner import pack

    packed = jax.device_put(pack(step_inp))
    # the variants below take the step's page tables whole, as the engine's program gathers them on the device
    dev = jax.device_put(dataclasses.replace(step_inp, attn=dataclasses.replace(
        step_inp.attn, page_tables=run.host_page_tables(step_inp))))

    def engine_step():
        """The engine's own compiled forward program for this bucket, on the real step input."""
        logits, _, run.kv, run.sstate, run.page_table = run.compiled[bucket](run.params, run.kv, run.sstate,
                                                                             run.page_table, packed)
        return logits
    attn_fn = make_attention_fn(cfg, eng.ecfg.attention_impl, eng.ecfg.attention_interpret)
    params = run.params

    def full(params, kv, inp, decode=False):
        attn = functools.partial(attn_fn, decode=decode)
        h, kv = forward(params, cfg, inp.token_ids, inp.positions, kv, inp.attn, attn)
        return jnp.argmax(compute_logits(params, cfg, h[inp.logits_indices]), -1), kv

    def chain(params, inp):
        eps, inv = cfg.rms_norm_eps, jnp.asarray(np.ones(cfg.head_dim // 2, np.float32))
        x = embed_tokens(params, inp.token_ids)
        for lp in params.layers:
            h = rms_norm(x, lp.attn_norm, eps)
            qkv = dot("td,dkgh->tkgh", h, lp.wqkv)
            q = qkv[:, :, :-2].reshape(qkv.shape[0], -1, cfg.head_dim) + qkv[:, :, -2:].sum(axis=2).mean()
            q = apply_rope(q, inp.positions, inv)
            x = x + dot("tnh,nhd->td", q, lp.wo)
            x = mlp_block(lp, cfg, x)
        return jnp.argmax(compute_logits(params, cfg, x[inp.logits_indices]), -1)

    def timeit(f, *a, donate_kv=False):
        if donate_kv:
            o, run.kv = f(params, run.kv, dev)
        else:
            o = f(*a)
        jax.block_until_ready(o)
        t = time.perf_counter()
        for _ in range(args.steps):
            if donate_kv:
                o, run.kv = f(params, run.kv, dev)
            else:
                o = f(*a)
        jax.block_until_ready(o)
        return (time.perf_counter() - t) / args.steps * 1e3

    res = {}
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) - params.embed.nbytes * (params.lm_head is not None)

    def record(name, ms):
        res[name] = ms
        if ms is None:
            return
        print(f"B={B} {name}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s of weights", flush=True)

    only = set(args.only.split(",")) if args.only else None

    def want(name):
        return only is None or name in only

    if want("engine"):
        record("engine", timeit(engine_step))
    if want("full"):
        record("full", timeit(jax.jit(full, donate_argnums=(1,)), donate_kv=True))
    decode_fn = jax.jit(functools.partial(full, decode=True), donate_argnums=(1,))
    if want("full_decode_kernel"):
        record("full_decode_kernel", timeit(decode_fn, donate_kv=True))
    if want("no_attention"):
        record("no_attention", timeit(jax.jit(chain), params, dev))
    if want("lm_head"):
        record("lm_head", timeit(jax.jit(lambda p, i: jnp.argmax(compute_logits(p, cfg, embed_tokens(p, i.token_ids)[i.logits_indices]), -1)), params, dev))
    if args.trace:
        jax.block_until_ready(engine_step())
        with jax.profiler.trace(args.trace, create_perfetto_trace=True):
            for _ in range(5):
                o = engine_step()
            jax.block_until_ready(o)
    out = {k: dict(ms=v, tb_s=nbytes / v / 1e9) for k, v in res.items()}
    out["weights_gb"] = nbytes / 1e9
    out["batch"] = B
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
