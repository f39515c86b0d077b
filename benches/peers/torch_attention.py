#!/usr/bin/env python3
"""PyTorch peer of `vkv bench kernels`: decode attention over the same grid through SDPA's flash
and cuDNN back ends (and FlexAttention with --flex: dense, and paged through PyTorch's experimental
PagedAttention page table), plus causal prefill of whole prompts
(TFLOP/s counting the causal pairs only), on the GPU machine (python3 there has PyTorch).

Decode of one query token per sequence with GQA is run in the form FlashAttention's own decode
path uses: the G query heads sharing a KV head become G query rows over that head
(q [B, Hkv, G, D], k/v [B, Hkv, ctx, D], non-causal), so each back end reads K and V once, as
vkv's kernel does. The native GQA call (q [B, Hq, 1, D], enable_gqa=True) is timed too where the
back end accepts it. Timing: CUDA events around each call, warm-up first, median of --iters runs
queued behind a sleeping kernel (so Python's launch overhead is not timed),
several copies of the KV in turn when one is under 256 MiB (L2 is 50 MB). The device-to-device copy
bandwidth (read + write) is measured in the same run. Prints a table (JSON with --json; --json-out FILE writes it too).
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, iters, warm=5):
    for i in range(warm):
        fn(i)
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    # Queue the timed calls behind a sleeping kernel (as vkv's bench does), so the events time the
    # device and not Python's launch overhead.
    torch.cuda._sleep(int((2000 + 300 * iters) * 2000))
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(warm + i)
        b.record()
    torch.cuda.synchronize()
    t = [a.elapsed_time(b) * 1e3 for a, b in ev]
    return statistics.median(t), min(t)


def copy_bw(iters):
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(0x3C)
    b = torch.empty_like(a)
    med, _ = timed(lambda i: b.copy_(a), iters, warm=3)
    return n, med, 2 * n / (med * 1e-6) / 1e12


# Shapes where the paged FlexAttention is measured (each shape and page size is a compile).
FLEX_PAGED_SHAPES = {(64, 2048), (16, 512)}


def flex_paged(a, bsz, ctx, hq, hk, d, page, q, scale, copy_tbps):
    """Decode through FlexAttention with a page table (PyTorch's experimental PagedAttention, the
    form its own paged-attention tests use): K and V in one pool of `page`-token pages
    [1, Hkv, pages * page, D], each sequence's pages scattered at random (as after hours of
    serving, like vkv's paged rows), the logical block mask converted to physical pages."""
    row = dict(backend="flex", form=f"paged-{page}", batch=bsz, context=ctx, n_heads=hq, n_kv_heads=hk, head_dim=d)
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if ctx % page:
            raise ValueError(f"context {ctx} is not a multiple of the page size {page}")
        n_pages = bsz * ctx // page
        kv_bytes = bsz * ctx * hk * d * 2 * 2
        copies = max(1, min(16, math.ceil((256 << 20) / kv_bytes)))
        paged = PagedAttention(n_pages, page, bsz, device="cuda")
        gen = torch.Generator().manual_seed(0)
        paged.empty_pages = torch.randperm(n_pages, generator=gen).tolist()
        for b in range(bsz):
            paged.reserve(torch.tensor(b, device="cuda"), torch.tensor(ctx, device="cuda"))
        shape = (1, hk, n_pages * page, d)
        kc = [torch.rand(shape, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(copies)]
        vc = [torch.rand(shape, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(copies)]
        logical = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, bsz, None, 1, ctx,
                                    device="cuda", BLOCK_SIZE=(page, page))
        mask = paged.convert_logical_block_mask(logical)
        flex = torch.compile(flex_attention, dynamic=False)
        fn = lambda i: flex(q, kc[i % copies], vc[i % copies], block_mask=mask, scale=scale, enable_gqa=True)
        med, mn = timed(fn, a.iters)
        tbps = kv_bytes / (med * 1e-6) / 1e12
        row.update(copies=copies, median_us=med, min_us=mn, kv_bytes=kv_bytes, kv_tb_per_s=tbps,
                   ratio_to_copy=tbps / copy_tbps)
        del kc, vc
    except Exception as e:  # reported, not fatal
        row["error"] = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="512,2048,8192")
    ap.add_argument("--heads", default="32/8")
    ap.add_argument("--head-dim", default="128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--prefill-batch", default="1,4")
    ap.add_argument("--prefill-context", default="1024,4096")
    ap.add_argument("--flex", action="store_true",
                    help="also FlexAttention: dense at batch 64 x context 2048, paged at 64 x 2048 and 16 x 512")
    ap.add_argument("--flex-page-size", default="16,128", help="page sizes of the paged FlexAttention rows")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--json-out", help="also write the JSON report to this file")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name(0)
    nbytes, copy_us, copy_tbps = copy_bw(20)
    rows = []
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for heads in a.heads.split(","):
        hq, hk = (int(x) for x in heads.split("/"))
        g = hq // hk
        for d in (int(x) for x in a.head_dim.split(",")):
            for bsz in (int(x) for x in a.batch.split(",")):
                for ctx in (int(x) for x in a.context.split(",")):
                    kv_bytes = bsz * ctx * hk * d * 2 * 2
                    copies = max(1, min(16, math.ceil((256 << 20) / kv_bytes)))
                    ks = [torch.rand(bsz, hk, ctx, d, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(copies)]
                    vs = [torch.rand(bsz, hk, ctx, d, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(copies)]
                    q_grouped = torch.rand(bsz, hk, g, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
                    q_native = q_grouped.reshape(bsz, hq, 1, d)
                    scale = 1.0 / math.sqrt(d)
                    for name, be in backends:
                        for form, q, extra in (("grouped", q_grouped, {}), ("native-gqa", q_native, {"enable_gqa": True})):
                            try:
                                with sdpa_kernel([be]):
                                    fn = lambda i: F.scaled_dot_product_attention(
                                        q, ks[i % copies], vs[i % copies], scale=scale, **extra)
                                    med, mn = timed(fn, a.iters)
                                tbps = kv_bytes / (med * 1e-6) / 1e12
                                rows.append(dict(backend=name, form=form, batch=bsz, context=ctx, n_heads=hq,
                                                 n_kv_heads=hk, head_dim=d, copies=copies, median_us=med, min_us=mn,
                                                 kv_bytes=kv_bytes, kv_tb_per_s=tbps, ratio_to_copy=tbps / copy_tbps))
                            except Exception as e:  # a back end that refuses a shape is reported, not fatal
                                rows.append(dict(backend=name, form=form, batch=bsz, context=ctx, n_heads=hq,
                                                 n_kv_heads=hk, head_dim=d, error=str(e).splitlines()[0][:160]))
                    if a.flex and (bsz, ctx) == (64, 2048):
                        # FlexAttention (compiled once, at the headline shape only: each shape is a
                        # compile), dense KV with native GQA. The paged form: `flex_paged`.
                        try:
                            from torch.nn.attention.flex_attention import flex_attention
                            flex = torch.compile(flex_attention, dynamic=False)
                            fn = lambda i: flex(q_native, ks[i % copies], vs[i % copies], scale=scale, enable_gqa=True)
                            med, mn = timed(fn, a.iters)
                            tbps = kv_bytes / (med * 1e-6) / 1e12
                            rows.append(dict(backend="flex", form="native-gqa", batch=bsz, context=ctx, n_heads=hq,
                                             n_kv_heads=hk, head_dim=d, copies=copies, median_us=med, min_us=mn,
                                             kv_bytes=kv_bytes, kv_tb_per_s=tbps, ratio_to_copy=tbps / copy_tbps))
                        except Exception as e:
                            rows.append(dict(backend="flex", form="native-gqa", batch=bsz, context=ctx, n_heads=hq,
                                             n_kv_heads=hk, head_dim=d, error=str(e).splitlines()[0][:160]))
                    if a.flex and (bsz, ctx) in FLEX_PAGED_SHAPES:
                        for page in (int(x) for x in a.flex_page_size.split(",")):
                            rows.append(flex_paged(a, bsz, ctx, hq, hk, d, page, q_native, scale, copy_tbps))
                    del ks, vs
                    torch.cuda.empty_cache()
    prefill = []
    for heads in a.heads.split(","):
        hq, hk = (int(x) for x in heads.split("/"))
        for d in (int(x) for x in a.head_dim.split(",")):
            for bsz in (int(x) for x in a.prefill_batch.split(",") if x):
                for n in (int(x) for x in a.prefill_context.split(",") if x):
                    q = torch.rand(bsz, hq, n, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
                    k = torch.rand(bsz, hk, n, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
                    v = torch.rand(bsz, hk, n, d, device="cuda", dtype=torch.bfloat16) * 2 - 1
                    flops = 4.0 * d * hq * bsz * n * (n + 1) / 2
                    for name, be in backends:
                        try:
                            with sdpa_kernel([be]):
                                fn = lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                                med, mn = timed(fn, min(a.iters, 20), warm=3)
                            prefill.append(dict(backend=name, batch=bsz, context=n, n_heads=hq, n_kv_heads=hk,
                                                head_dim=d, median_us=med, min_us=mn, flops=flops,
                                                tflop_per_s=flops / (med * 1e-6) / 1e12))
                        except Exception as e:
                            prefill.append(dict(backend=name, batch=bsz, context=n, n_heads=hq, n_kv_heads=hk,
                                                head_dim=d, error=str(e).splitlines()[0][:160]))
                    del q, k, v
    report = dict(device=dev, torch=torch.__version__, copy_bytes=nbytes, copy_median_us=copy_us,
                  copy_tb_per_s=copy_tbps, rows=rows, prefill=prefill)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(report, f, indent=1)
    if a.json:
        print(json.dumps(report, indent=1))
        return
    print(f"device: {dev}, torch {torch.__version__}; device-to-device copy {copy_tbps:.3f} TB/s (read + write)")
    print(f"{'backend':<8} {'form':<11} {'batch':>5} {'context':>7} {'heads':>6} {'dim':>4} {'median us':>10} {'KV TB/s':>8} {'vs copy':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<8} {r['form']:<11} {r['batch']:>5} {r['context']:>7} {r['n_heads']}/{r['n_kv_heads']:<3} {r['head_dim']:>4}  unsupported: {r['error']}")
        else:
            print(f"{r['backend']:<8} {r['form']:<11} {r['batch']:>5} {r['context']:>7} {r['n_heads']:>3}/{r['n_kv_heads']:<2} {r['head_dim']:>4} "
                  f"{r['median_us']:>10.1f} {r['kv_tb_per_s']:>8.3f} {100 * r['ratio_to_copy']:>7.1f}%")
    print(f"causal prefill: {'backend':<8} {'batch':>5} {'context':>7} {'heads':>6} {'dim':>4} {'median us':>10} {'TFLOP/s':>8}")
    for r in prefill:
        if "error" in r:
            print(f"causal prefill: {r['backend']:<8} {r['batch']:>5} {r['context']:>7}  unsupported: {r['error']}")
        else:
            print(f"causal prefill: {r['backend']:<8} {r['batch']:>5} {r['context']:>7} {r['n_heads']:>3}/{r['n_kv_heads']:<2} "
                  f"{r['head_dim']:>4} {r['median_us']:>10.1f} {r['tflop_per_s']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
