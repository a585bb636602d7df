"""`thrifty demo`: trains the tiny preset on the embedded corpus (the Python standard library's
sources) for about three minutes, shows the loss falling, then samples a few lines."""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--time-budget", default="3m", help="training time (default 3m)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; replaced)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)


def loss_points(rows: list[dict], n: int = 8) -> list[dict]:
    """About ``n`` evenly spaced training rows, the last one always included, each once."""
    picked = list(range(0, len(rows), max(1, len(rows) // n)))
    if rows and picked[-1] != len(rows) - 1:
        picked.append(len(rows) - 1)
    return [rows[i] for i in picked]


def main(args) -> int:
    from thrifty.train.cli import run
    from thrifty.train.generate_cli import generate_text, load
    from thrifty.train.trainer import TrainConfig, _metrics_rows

    out = Path(args.out)
    # an earlier demo's checkpoints are replaced by the trainer once the options pass its checks
    cfg = TrainConfig(preset="tiny", time_budget=args.time_budget, seq_len=args.seq_len, batch_size=args.batch_size,
                      lr=2e-3, warmup=20, out=str(out), eval_every=50, eval_batches=4, keep_last=1,
                      replace_checkpoints=True,
                      default_corpus_caps=dict(max_files=200, max_bytes=2_000_000))
    rc = run(cfg, prog="thrifty demo", restart_only=True)
    if rc:
        return rc
    rows = _metrics_rows(out / "metrics.jsonl")
    tr = [r for r in rows if r.get("loss") is not None]  # a skipped step logs null
    va = [r for r in rows if "val_loss" in r]
    print("\nloss falling:")
    for r in loss_points(tr):
        print(f"  step {r['step']:5d}  loss {r['loss']:.3f}")
    if va:
        print(f"final validation loss {va[-1]['val_loss']:.3f} (perplexity {va[-1]['val_ppl']:.1f})")
    model, tok = load(out)
    print("\nsamples:")
    for text in generate_text(model, tok, ["def ", "import ", "class "], max_new_tokens=48, temperature=0.7):
        print(text)
        print("-" * 40)
    print(f"\nmodel, tokenizer, metrics.jsonl and loss_curve.png in {out}; try: thrifty generate {out} --prompt 'def '")
    return 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="thrifty demo")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
