"""`thrifty train`: train or fine-tune a Llama-family model from raw text.

With no arguments it trains the `tiny` preset on the embedded default corpus (the Python
standard library's own sources) into runs/default. Under torchrun it runs data-parallel:
    torchrun --nproc-per-node 2 -m thrifty train --data corpus/ [--fsdp]
Exit codes: 0 done, 2 bad input / does not fit (nothing half-written), 3 stopped on repeated NaN.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from thrifty.train.lora import DEFAULT_TARGETS


def add_arguments(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help="directory (searched recursively) or file of plain text (.txt .text .md .rst .py), "
                                  ".jsonl (\"text\" field) or .parquet; a single document has its tail held out for "
                                  "validation; default: the embedded corpus (Python's standard library sources; "
                                  "--resume: the run's own)")
    g.add_argument("--text-field", default="text", help="the text field of .jsonl / column of .parquet (default text)")
    g.add_argument("--tokenizer", help="a tokenizer.json to use (default: the --model's, else train a byte-level BPE)")
    g.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when training one (default 8192)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation (default 0.05)")
    g = p.add_argument_group("model")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="train from scratch (default tiny)")
    m.add_argument("--model", help="Hugging Face model directory to fine-tune (Llama, Mistral, Qwen2)")
    g = p.add_argument_group("schedule")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--steps", type=int, help="optimizer steps (default: a 10-minute --time-budget)")
    s.add_argument("--time-budget", help="train for this long: 90s, 10m, 1h30m")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 scratch, 5e-5 fine-tune, 5e-4 LoRA)")
    g.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the steps, at most 100)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--optimizer", choices=["adamw", "adamw8bit", "lion"], default="adamw")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16: bf16 weights + fp32 master weights in the optimizer; auto: bf16 where the device "
                        "has fast bf16 matmul (GPU, AVX512-BF16/AMX CPU), else fp32")
    g.add_argument("--no-master-weights", action="store_true",
                   help="bf16: update the bf16 weights directly, without float32 master copies (4 bytes/param less)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in the backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters only (merged on export)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS), help="comma-separated linear layer names")
    g.add_argument("--lora-base-bits", type=int, choices=[16, 8, 4], default=16,
                   help="QLoRA: 4 (or 8) quantizes the frozen base with thrifty's int4 (int8) layers (default 16: no)")
    g.add_argument("--qlora", action="store_true", help="shorthand for --lora-base-bits 4")
    g.add_argument("--lora-group-size", type=int, default=64, help="int4 group size of the QLoRA base (default 64)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run directory (default runs/default for the embedded corpus, else runs/run-<time>)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (always one at the end; 0: only that one)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default 2)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in --out; options not given (--model, --data, --tokenizer, "
                   "--steps / --time-budget, and --batch-size / --grad-accum / --seq-len left at their defaults) are "
                   "the run's own; its optimizer and schedule keep their lr, weight decay and warmup")
    g.add_argument("--eval-every", type=int, help="validation every N steps (default steps/10)")
    g.add_argument("--eval-batches", type=int, default=8,
                   help="validation global batches (batch-size x grad-accum x processes rows each; default 8)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 fully_shard instead of DDP")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU if any)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--max-nan-steps", type=int, default=5, help="consecutive non-finite steps that stop the run")


def config_from_args(args):
    from thrifty.train.trainer import TrainConfig

    return TrainConfig(
        data=args.data, text_field=args.text_field, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, preset=args.preset, model=args.model, steps=args.steps,
        time_budget=args.time_budget, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        optimizer=args.optimizer, precision=args.precision, master_weights=not args.no_master_weights,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile, seed=args.seed, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        lora_base_bits=4 if args.qlora else args.lora_base_bits, lora_group_size=args.lora_group_size, out=args.out,
        save_every=args.save_every, keep_last=args.keep_last, resume=args.resume, eval_every=args.eval_every,
        eval_batches=args.eval_batches, fsdp=args.fsdp, device=args.device, progress=not args.no_progress,
        max_nan_steps=args.max_nan_steps)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is (unwinding as Ctrl-C does: temp files of a save are removed at the
    next start, finished checkpoints stay)."""


def _terminated(signum, frame):
    raise Terminated()


def _interrupted(e: KeyboardInterrupt, trainer, restart_only: bool) -> str:
    """What Ctrl-C / SIGTERM left, and the command that goes on from there."""
    what = "terminated" if isinstance(e, Terminated) else "interrupted"
    if restart_only:  # thrifty demo: no --resume; it starts over, replacing its earlier run
        return f"{what}; run it again to start over"
    done = trainer._checkpoints() if getattr(trainer, "run_dir", None) is not None else []
    if not done:
        return f"{what} before the first checkpoint: nothing to resume; the same command starts over"
    return f"{what}; the checkpoints up to {done[-1].name} are intact: continue with --resume"


def run(config, prog: str = "thrifty train", restart_only: bool = False) -> int:
    """Runs a TrainConfig; maps failures to a message on stderr and an exit code. ``restart_only``: the
    command has no --resume (thrifty demo), which an interruption's message then does not offer."""
    from thrifty.train.trainer import Trainer, TrainError, TrainStopped

    def say(msg: str, shared: bool = False) -> None:
        # Under torchrun rank 0 says an error as it is; another rank says its own marked [rank N]: it may be that
        # rank's alone (its GPU, its memory) while rank 0 waits in a collective. A NaN stop is decided alike on
        # every rank (the skip decision is reduced): rank 0 alone says it.
        rank = os.environ.get("RANK") or "0"
        if rank == "0":
            print(msg, file=sys.stderr)
        elif not shared:
            print(f"[rank {rank}] {msg}", file=sys.stderr)

    # SIGTERM (kill, docker stop, a batch scheduler's preemption) ends the run as Ctrl-C does: the message and
    # the exit status say what to do. One process only: under torchrun the launcher terminates the ranks.
    own_sigterm = "WORLD_SIZE" not in os.environ and threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, _terminated) if own_sigterm else None
    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    except TrainError as e:
        say(f"{prog}: error: {e}")
        return 2
    except TrainStopped as e:
        say(f"{prog}: {e}", shared=True)
        return 3
    except KeyboardInterrupt as e:
        print(f"{prog}: {_interrupted(e, trainer, restart_only)}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, before)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError as e:  # a peer already gone (DistBackendError): the run's own outcome stands
                print(f"{prog}: note: tearing down the process group failed: {e}", file=sys.stderr)
    return 0


def main(args) -> int:
    return run(config_from_args(args))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="thrifty train")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
