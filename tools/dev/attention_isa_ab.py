"""A/B of thrifty's CPU attention forward at two or more ISA levels in one process, interleaved, against
torch SDPA (b1 h8 s2048, d64/d128, causal or not, bf16 and float32; 2 threads; best of 5, twice).
Written to compare a level-specific kernel with the common one on the same machine (the GPU host's
AVX-512 BF16 Xeon: bench/RESULTS.md, attention).   python tools/dev/attention_isa_ab.py [levels...]"""
import sys
import time

import torch
import torch.nn.functional as F

import thrifty

torch.set_num_threads(2)
levels = sys.argv[1:] or ["avx512", "avx512_bf16"]
avail = thrifty._C.cpu_isa_available()
levels = [lv for lv in levels if lv in avail]
print("levels", levels, "of", avail, "threads", torch.get_num_threads())


def best(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


for dtype in (torch.bfloat16, torch.float32):
    for d in (64, 128):
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2048, 8, d, generator=g).to(dtype) for _ in range(3))  # (b, s, h, d)
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            row = {}
            for _ in range(2):  # interleave the levels twice
                for lv in levels:
                    prev = thrifty._C.set_cpu_isa(lv)
                    t = best(lambda: thrifty.ops.flash_attention(q, k, v, causal=causal))
                    thrifty._C.set_cpu_isa(prev)
                    row[lv] = min(row.get(lv, 1e9), t)
                row["sdpa"] = min(row.get("sdpa", 1e9), best(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)))
            fl = 4 * 2048 * 2048 * 8 * d / (2 if causal else 1)
            print(f"{str(dtype)[6:]:8s} d{d:<3d} {'causal' if causal else 'full  '} "
                  + "  ".join(f"{lv} {t * 1e3:7.2f} ms ({fl / t / 1e12:.3f} TF/s, x{row['sdpa'] / t:.2f} sdpa)"
                              for lv, t in row.items()), flush=True)
