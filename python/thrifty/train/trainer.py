"""`thrifty.train.Trainer`: from raw text to a Hugging Face checkpoint.

    from thrifty.train import Trainer, TrainConfig
    result = Trainer(TrainConfig(preset="tiny", steps=200, out="runs/tiny")).train()

One process, or one per device under torchrun (DDP by default, FSDP2 ``fully_shard`` with
``fsdp=True``; gloo on CPU, NCCL on GPU). See :class:`TrainConfig` for every knob.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import numbers
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError

from thrifty._alloc import tune_cpu_malloc
from thrifty.data import IGNORE_INDEX, DataError, ResumableSampler, prepare_data
from thrifty.data import tokenizer as tokmod
from thrifty.data.sources import replace_text
from thrifty.train import _compat, lora as loramod
from thrifty.train.run_dir import step_dirs, step_of


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad input, does not fit); the CLI exits with code 2."""


class TrainStopped(RuntimeError):
    """Repeated non-finite losses stopped the run (the last good checkpoint is intact); exit code 3."""


@dataclass
class TrainConfig:
    # data
    data: str | None = None                 # dir/file of .txt/.jsonl/.parquet; None: embedded stdlib corpus
    text_field: str = "text"
    tokenizer: str | None = None            # tokenizer.json (or dir); None: train BPE (or use --model's)
    vocab_size: int = 8192
    val_fraction: float = 0.05
    default_corpus_caps: dict | None = None
    replace_checkpoints: bool = False        # `thrifty demo`: an earlier run's checkpoints in --out are replaced
    # model
    preset: str = "tiny"
    model: str | None = None                # HF directory to fine-tune from
    model_overrides: dict | None = None     # LlamaConfig fields over the preset (tests, experiments)
    # schedule
    steps: int | None = None
    time_budget: float | str | None = None  # seconds or "10m", "1h30m"
    batch_size: int = 8                     # sequences per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 256
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    optimizer: str = "adamw"
    precision: str = "auto"                 # bf16 | fp32 | auto (bf16 where the device has fast bf16 matmul)
    master_weights: bool = True             # bf16: float32 master weights in the optimizer (False: the bf16
                                            # params are updated directly, 4 bytes/param less, like a plain bf16 loop)
    activation_checkpointing: bool = False
    compile: bool = False
    # LoRA
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple = loramod.DEFAULT_TARGETS
    lora_dropout: float = 0.0
    lora_base_bits: int = 16                # QLoRA: 4 (or 8) quantizes the frozen base linears (thrifty.nn.QuantLinear)
    lora_group_size: int = 64               # int4 group size of the quantized base
    # run dir, checkpoints, logging
    out: str | None = None
    save_every: int | None = None
    keep_last: int = 2
    resume: bool = False
    eval_every: int | None = None
    eval_batches: int = 8
    log_every: int = 1
    seed: int = 0
    max_nan_steps: int = 5                  # consecutive non-finite steps that stop the run
    fsdp: bool = False
    device: str | None = None
    progress: bool = True
    plot: bool = True
    # testing hooks
    stop_at_step: int | None = None         # leave as if killed after this step (after its checkpoint)
    inject_nan_steps: tuple = ()            # steps whose loss is made NaN

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"TrainConfig: unknown fields {unknown}")
        return cls(**d)


def parse_duration(v) -> float | None:
    """'10m' / '90s' / '1h30m' / '600' -> seconds."""
    if v is None or isinstance(v, (int, float)):
        return None if v is None else float(v)
    s = str(v).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise TrainError(f"--time-budget: expected a duration like 90s, 10m or 1h30m, got {v!r}")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[u] for a, u in parts)


class WarmupCosine:
    """lr multiplier: linear warmup, then cosine to ``min_ratio`` at ``total`` steps (a picklable
    callable, so LambdaLR's state_dict carries it)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# --time-budget: the first steps of a process are slow (allocations, kernel choice) and are left out of
# the step rate; the step count is estimated again after 1, 2, 4, 8, ... measured steps while under this
# share of the budget is used, then kept (and saved with the checkpoints, so a --resume keeps the schedule)
BUDGET_WARMUP_STEPS = 2
BUDGET_ESTIMATE_FRACTION = 0.2


def parse_device(spec: str, flag: str) -> torch.device:
    """torch.device(spec) for a user's flag, with a TrainError (not torch's RuntimeError) for a bad or absent one."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise TrainError(f"{flag}: expected cpu, cuda or cuda:N, got {spec!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"{flag}: expected cpu, cuda or cuda:N, got {spec!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"{flag} {spec}: no CUDA device is available to this torch "
                         f"({torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})")
    return dev


def finite_or_none(d: dict) -> dict:
    """d with non-finite floats (a skipped step's NaN loss) as None: strict JSON has no NaN/Infinity."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def json_line(row: dict) -> str:
    """One metrics.jsonl row, strict JSON (NaN -> null), so jq and JSON parsers other than Python's read it."""
    return json.dumps(finite_or_none(row), allow_nan=False)


def default_warmup(total_steps: int) -> int:
    """lr warmup steps when --warmup is not given: 5% of the run, at most 100 (a --time-budget run's
    estimated step count sets it, like --steps)."""
    return max(1, min(100, total_steps // 20))


_PEAK_CACHE: dict = {}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Matmul FLOP/s in ``dtype`` measured on this device now (the MFU denominator): the best of six
    ~40 ms windows. A single window could land in a slow spell of a shared machine (the 2-vCPU CI box
    halves its matmul rate for seconds at a time) and then report an MFU over 100%."""
    key = f"{device}-{dtype}"
    if key not in _PEAK_CACHE:
        n = 4096 if device.type == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        best = 0.0
        for _ in range(6):
            if device.type == "cuda":
                torch.cuda.synchronize()
            reps, t0 = 0, time.perf_counter()
            while reps < 2 or time.perf_counter() - t0 < 0.04:
                a @ b
                reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        _PEAK_CACHE[key] = best
    return _PEAK_CACHE[key]


def _metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """metrics.jsonl's (line, row) pairs; a line that is not a JSON object (the last one cut short by a power
    loss or a full disk) is skipped, not a JSONDecodeError traceback at --resume."""
    if not Path(path).is_file():
        return []
    out = []
    for ln in Path(path).read_text().splitlines():
        try:
            row = json.loads(ln)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append((ln, row))
    return out


def _metrics_rows(path: Path) -> list[dict]:
    return [row for _, row in _metrics_lines(path)]


def model_flops_per_token(cfg, seq_len: int) -> float:
    """6 N (matmul parameters, LM head included) + 6 L d S (causal attention scores and values)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // H
    per_layer = d * hd * (H + 2 * K) + H * hd * d + 3 * d * cfg.intermediate_size
    n = L * per_layer + d * cfg.vocab_size
    return 6 * n + 6 * L * H * hd * seq_len


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    import thrifty

    if thrifty._C.cpu_isa_detected() != "avx512_bf16":  # the CPU's bf16 dot products (AMX CPUs have them too)
        return False
    try:  # and torch's oneDNN uses them (a private query: a torch without it counts as no)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RunDirSnapshot:
    """What an existing RUN_DIR held before a start, so that a run that fails before its first checkpoint
    leaves it byte for byte as it was (a failed --resume must not leave a new tokenizer.json or data cache
    next to checkpoints trained with the old ones): the files it overwrote come back from hard links taken
    here (every writer replaces a file by rename, never rewrites it in place), the files it added go.
    checkpoints/ is not covered: only a checkpoint save writes there, and after one the run has started."""

    def __init__(self, rd: Path):
        self.rd = rd
        self.keep = rd / f".tmp-restore-{os.getpid()}"
        self.before = set()
        for p in self._walk(rd):
            rel = p.relative_to(rd)
            self.before.add(rel)
            if p.is_file() and not p.is_symlink():
                dst = self.keep / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(p, dst)
                except OSError:  # no hard links on this filesystem
                    shutil.copy2(p, dst)

    def _walk(self, d: Path, top: bool = True):
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if top and e.name.startswith(".tmp-restore-"):  # ours, or a killed run's (removed by the next start)
                continue
            yield Path(e.path)
            if e.is_dir(follow_symlinks=False) and not (top and e.name == "checkpoints"):
                yield from self._walk(Path(e.path), False)

    def restore(self) -> None:
        for rel in self.before:
            src = self.keep / rel
            if src.is_file():
                try:
                    (self.rd / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, self.rd / rel)
                except OSError:
                    pass
        for p in sorted(self._walk(self.rd), key=lambda p: len(p.parts), reverse=True):  # deepest first
            if p.relative_to(self.rd) not in self.before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.keep, ignore_errors=True)


def _rank_info():
    env = os.environ  # set but empty counts as unset
    return int(env.get("RANK") or 0), int(env.get("WORLD_SIZE") or 1), int(env.get("LOCAL_RANK") or 0)


class Trainer:
    """Builds data, model and optimizer from a :class:`TrainConfig` and runs :meth:`train`."""

    def __init__(self, config: TrainConfig | dict | None = None, **kwargs):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        elif config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: config must be a TrainConfig or a dict, got {type(config).__name__}")
        self.cfg = copy.deepcopy(config) if config is not None else TrainConfig()
        for k, v in kwargs.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"Trainer: unknown option {k!r}")
            setattr(self.cfg, k, v)
        self.rank, self.world, self.local_rank = _rank_info()
        self.is_main = self.rank == 0
        self._bar = None
        self._ckpts_written = 0  # by this Trainer: after the first one a failure no longer restores RUN_DIR
        # the options given other than their defaults (the command line cannot say "not given"): a --resume takes
        # the run's own for the others, and notes the given ones the checkpoint's state keeps
        defaults = TrainConfig()
        self._options_set = {f.name for f in fields(TrainConfig)
                             if getattr(self.cfg, f.name) != getattr(defaults, f.name)}
        self._noted_damaged = False  # the note on a damaged newest checkpoint is said once

    # ---------- logging ----------
    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    # ---------- setup ----------
    def _setup_distributed(self):
        c = self.cfg
        if c.device:
            dev = parse_device(c.device, "--device")
            if dev.type == "cuda" and dev.index is None:  # "cuda" means this rank's GPU (set_device wants an index)
                dev = torch.device("cuda", self.local_rank)
            elif dev.type == "cuda" and self.world > 1:  # every process on one GPU: NCCL refuses it, later and obscurely
                raise TrainError(f"--device {c.device} under torchrun: each of the {self.world} processes takes the GPU "
                                 "of its LOCAL_RANK; pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
            if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
                raise TrainError(f"--device {c.device}: this process would use GPU {dev.index}, but "
                                 f"{torch.cuda.device_count()} are visible")
        elif torch.cuda.is_available():
            dev = torch.device("cuda", self.local_rank)
        else:
            dev = torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        self.device = dev
        self.distributed = self.world > 1
        if self.distributed:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")

    def _run_dir(self) -> Path:
        c = self.cfg
        if c.out:
            return Path(c.out)
        return Path("runs") / ("default" if c.data is None and c.model is None else time.strftime("run-%Y%m%d-%H%M%S"))

    def _check_out_dir(self) -> None:
        """--out must be a directory (or not exist yet) outside --data: a run written into its own corpus
        would read its metrics.jsonl as training data the next time."""
        rd = self.run_dir
        if rd.exists() and not rd.is_dir():
            raise TrainError(f"--out: {str(rd)!r} exists and is not a directory")
        if self.cfg.data is not None:
            data = Path(self.cfg.data).resolve()
            out = rd.resolve()
            if data.is_dir() and (out == data or data in out.parents):
                raise TrainError(f"--out: {str(rd)!r} is inside the --data directory {str(self.cfg.data)!r} (the run's "
                                 "files would become training data): choose another --out")

    def _build_model(self, vocab: int, eos: int | None):
        c = self.cfg
        Llama, LlamaConfig, is_thrifty = _compat.model_api()
        self.thrifty_model = is_thrifty
        torch.manual_seed(c.seed)
        if c.model:
            mdir = Path(c.model)
            try:
                model = Llama.from_pretrained(str(mdir))
            except SafetensorError as e:
                raise TrainError(f"--model: {str(mdir)!r} holds a corrupt or truncated *.safetensors file ({e})") from None
            except (OSError, ValueError) as e:
                raise TrainError(f"--model: cannot load {str(mdir)!r}: {e}") from None
            mv = model.config.vocab_size
            if vocab > mv:
                raise TrainError(f"tokenizer/model vocab mismatch: the tokenizer has {vocab} tokens but the model "
                                 f"at {mdir} embeds only {mv}; use the model's own tokenizer.json (--tokenizer)")
        else:
            over = dict(c.model_overrides or {})
            over.setdefault("vocab_size", int(math.ceil(vocab / 64) * 64))
            over.setdefault("max_position_embeddings", max(2048, c.seq_len))
            # the tokenizer's end-of-text token; without one, no eos / bos (LlamaConfig's defaults 2 / 1 would name
            # whatever tokens got those ids, and generation would stop at one of them)
            over.setdefault("eos_token_id", eos)
            bos = tokmod.bos_id(self.tokenizer)  # a given tokenizer's <s> / <|begin_of_text|>, else the eos
            over.setdefault("bos_token_id", eos if bos is None else bos)
            cfg = _compat.preset_config(c.preset, **over)
            if vocab > cfg.vocab_size:
                raise TrainError(f"tokenizer/model vocab mismatch: the tokenizer has {vocab} tokens, "
                                 f"the model config embeds {cfg.vocab_size}")
            model = Llama(cfg)
            if hasattr(model, "init_weights"):
                model.init_weights()
        mcfg = model.config
        if c.seq_len > getattr(mcfg, "max_position_embeddings", c.seq_len):
            raise TrainError(f"--seq-len {c.seq_len} exceeds the model's max_position_embeddings "
                             f"{mcfg.max_position_embeddings}")
        return model

    def _check_fits(self, model) -> None:
        """Refuses a micro-batch that clearly cannot fit in memory, before allocating it."""
        c, mc = self.cfg, self.model_config
        n_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pbytes = 2 if self.param_dtype == torch.bfloat16 else 4
        opt_bytes = {"adamw": 8, "adamw8bit": 2.1, "lion": 4}[c.optimizer] + (4 if self.master_weights else 0)
        static = n_params * pbytes + trainable * (pbytes + opt_bytes)
        if self.distributed and c.fsdp:
            static /= self.world
        B, S, d, L = c.batch_size, c.seq_len, mc.hidden_size, mc.num_hidden_layers
        H = mc.num_attention_heads
        act_b = 2 if c.precision == "bf16" else 4
        per_layer = B * S * d * 17 * act_b + B * H * S * S * act_b * (0 if self.device.type == "cuda" else 1)
        acts = (B * S * d * act_b * L + per_layer) if c.activation_checkpointing else per_layer * L
        logits = B * S * mc.vocab_size * 4 * 2
        need = static + acts + logits
        avail = _available_memory(self.device)
        if avail is not None and need > 0.9 * avail:
            raise TrainError(
                f"a micro-batch of {B} x {S} tokens does not fit: about {need / 2**30:.1f} GiB needed "
                f"(parameters, gradients and optimizer state {static / 2**30:.1f} GiB, activations {acts / 2**30:.1f} GiB, "
                f"logits {logits / 2**30:.1f} GiB), {avail / 2**30:.1f} GiB available on {self.device}; lower "
                "--batch-size (raise --grad-accum to keep the global batch) or --seq-len, or add --activation-checkpointing")

    def _check_numbers(self) -> None:
        """Options out of range, before anything is written (the optimizer checks lr, betas, weight decay)."""
        c = self.cfg

        def count(name, lo, what, none_ok=False):
            v = getattr(c, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise TrainError(f"--{name.replace('_', '-')}: expected {what}, got {v!r}")

        count("warmup", 0, "a number of steps >= 0", none_ok=True)
        count("eval_every", 1, "a number of steps >= 1", none_ok=True)
        count("eval_batches", 1, "a number of batches >= 1 (--val-fraction 0: no validation)")
        count("log_every", 1, "a number of steps >= 1")
        count("keep_last", 1, "a number of checkpoints >= 1")
        count("max_nan_steps", 1, "a number of steps >= 1")
        if c.grad_clip is not None and not (isinstance(c.grad_clip, (int, float)) and 0 <= c.grad_clip < math.inf):
            raise TrainError(f"--grad-clip: expected a finite norm >= 0 (0: off), got {c.grad_clip!r}")
        if c.lora_alpha is not None and not (isinstance(c.lora_alpha, (int, float)) and 0 < c.lora_alpha < math.inf):
            raise TrainError(f"--lora-alpha: expected a finite number > 0, got {c.lora_alpha!r}")
        if c.lora_alpha is not None and not c.lora_rank:  # as --lora-base-bits: no adapters, nothing to scale
            raise TrainError(f"--lora-alpha {c.lora_alpha} (the adapters' scale) needs --lora-rank R")
        # checked here rather than by the optimizer, whose message says "lr must be >= 0.0", not the flag
        for name in ("lr", "weight_decay"):
            v = getattr(c, name)
            if v is None and name == "lr":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf:
                raise TrainError(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {v!r}")
        if isinstance(c.seed, bool) or not isinstance(c.seed, numbers.Integral) or not 0 <= c.seed < 2**32:
            raise TrainError(f"--seed: expected an integer in [0, 2**32), got {c.seed!r}")
        if not (isinstance(c.min_lr_ratio, (int, float)) and 0 <= c.min_lr_ratio <= 1):
            raise TrainError(f"min_lr_ratio: expected a fraction in [0, 1], got {c.min_lr_ratio!r}")

    def _check_model_dir(self) -> None:
        """--model must be a floating-point Hugging Face directory: checked before the data is prepared, so the
        real problem is reported (not a missing tokenizer.json) and nothing is trained that cannot be exported."""
        mdir = Path(self.cfg.model)
        if not (mdir / "config.json").is_file():
            what = "does not exist" if not mdir.exists() else "is not a Hugging Face model directory (no config.json)"
            raise TrainError(f"--model: {str(mdir)!r} {what}")
        try:
            raw = json.loads((mdir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise TrainError(f"--model: cannot read {str(mdir / 'config.json')!r} ({e})") from None
        qc = raw.get("quantization_config") if isinstance(raw, dict) else None
        if qc is not None:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            raise TrainError(f"--model: {str(mdir)!r} holds a quantized model (quant_method {method!r}); training "
                             "and LoRA need its floating-point weights: pass the original model (with --lora-rank R "
                             "--qlora for LoRA on a 4-bit frozen base)")

    def setup(self) -> None:
        c = self.cfg
        self._resume_run_options()
        self._check_numbers()  # no side effects yet: before any process group or device is touched
        self._setup_distributed()
        if c.model:
            self._check_model_dir()
        if c.fsdp and not self.distributed:
            self.log("--fsdp: a single process has nothing to shard (launch with torchrun); training unsharded")
        if c.precision not in ("bf16", "fp32", "auto"):
            raise TrainError(f"--precision: expected bf16, fp32 or auto, got {c.precision!r}")
        if c.precision == "auto":
            c.precision = "bf16" if fast_bf16(self.device) else "fp32"
            self.log(f"precision: {c.precision} ({'this device has fast bf16 matmul' if c.precision == 'bf16' else 'no native bf16 matmul on this CPU (AVX2 only): bf16 would run several times slower than fp32'})")
        if c.optimizer not in ("adamw", "adamw8bit", "lion"):
            raise TrainError(f"--optimizer: expected adamw, adamw8bit or lion, got {c.optimizer!r}")
        if c.lora_rank and (isinstance(c.lora_rank, bool) or not isinstance(c.lora_rank, int) or c.lora_rank < 0):
            raise TrainError(f"--lora-rank: expected a positive integer (0: off), got {c.lora_rank!r}")
        if isinstance(c.lora_targets, str):
            c.lora_targets = tuple(t.strip() for t in c.lora_targets.split(",") if t.strip())
        if c.lora_base_bits not in (4, 8, 16):
            raise TrainError(f"--lora-base-bits: expected 16 (floating-point base), 8 or 4 (QLoRA), got {c.lora_base_bits}")
        if c.lora_base_bits != 16 and not c.lora_rank:
            raise TrainError(f"--lora-base-bits {c.lora_base_bits} (a quantized frozen base) needs --lora-rank R")
        if c.lora_base_bits == 4 and (c.lora_group_size <= 0 or c.lora_group_size % 32):
            raise TrainError(f"--lora-group-size: expected a positive multiple of 32, got {c.lora_group_size}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(c, name) < 1 or (name == "seq_len" and c.seq_len < 8):
                raise TrainError(f"--{name.replace('_', '-')}: expected a positive value (seq-len >= 8), got {getattr(c, name)}")
        if not 0 <= c.val_fraction < 1:  # NaN too
            raise TrainError(f"--val-fraction: expected a fraction in [0, 1) (0: no validation split), got {c.val_fraction}")
        if c.steps is not None and c.steps < 1:
            raise TrainError(f"--steps: expected a positive number, got {c.steps}")
        if c.save_every is not None and c.save_every < 0:
            raise TrainError(f"--save-every: expected a number of steps (0: only at the end), got {c.save_every}")
        self.time_budget = parse_duration(c.time_budget)
        if self.time_budget is not None and not 0 < self.time_budget < math.inf:  # NaN too
            raise TrainError(f"--time-budget: expected a positive duration like 90s, 10m or 1h30m, got {c.time_budget!r}")
        if c.steps is None and self.time_budget is None:
            self.time_budget = 600.0
            self.log("schedule: neither --steps nor --time-budget given: training for 10 minutes")
        self.run_dir = getattr(self, "run_dir", None) or self._run_dir()
        self._check_out_dir()
        if not c.resume and self._checkpoints():
            if not c.replace_checkpoints:
                raise TrainError(f"{self.run_dir} already holds checkpoints: pass --resume (TrainConfig resume=True) to continue it, or another --out")
            shutil.rmtree(self._ckpt_root())  # only now, after every option was checked
        if c.resume and not self._latest_checkpoint():
            raise TrainError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        if c.resume:
            self._resume_data_options()
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        np.random.seed(c.seed)
        if self.device.type == "cpu":  # fresh pages for every large tensor of every step cost ~15% (thrifty._alloc)
            self.log(f"allocator: {tune_cpu_malloc()}")

        # ---- data (rank 0 prepares, the others wait and read the cache)
        tok_arg = c.tokenizer
        if tok_arg is None and c.model and (Path(c.model) / "tokenizer.json").is_file():
            tok_arg = str(Path(c.model) / "tokenizer.json")
        if tok_arg is None and c.model:  # a BPE trained here would not match the model's embeddings
            raise TrainError(f"--model {c.model} has no tokenizer.json: pass the model's tokenizer with --tokenizer "
                             f"(a tokenizer trained on this corpus would not match the model's embeddings)")
        if tok_arg is None and c.resume and (self.run_dir / "tokenizer.json").is_file():
            pass  # the cache fingerprint covers the trained tokenizer
        prep = lambda: prepare_data(c.data, self.run_dir, c.seq_len, tokenizer=tok_arg, vocab_size=c.vocab_size,  # noqa: E731
                                    val_fraction=c.val_fraction, text_field=c.text_field,
                                    default_caps=c.default_corpus_caps, log_fn=self.log)
        if self.distributed:
            import torch.distributed as dist
            if self.is_main:
                try:
                    self.data = prep()
                    ok = torch.tensor(1)
                except Exception:
                    dist.broadcast(torch.tensor(0), 0)
                    raise
                dist.broadcast(ok, 0)
            else:
                ok = torch.tensor(0)
                dist.broadcast(ok, 0)
                if not ok.item():
                    raise TrainError("rank 0 failed to prepare the data")
                self.data = prep()
        else:
            self.data = prep()
        self.tokenizer = self.data.tokenizer
        gb = c.batch_size * c.grad_accum * self.world
        self.global_batch = gb
        vocab = tokmod.vocab_size(self.tokenizer)

        # ---- model
        model = self._build_model(vocab, tokmod.eos_id(self.tokenizer))
        self.model_config = model.config
        # FSDP2 parameters are DTensors, which thrifty.optim's fused kernels do not take (no sharding strategy):
        # under --fsdp the optimizer is torch.optim.AdamW over fp32 shards, bf16 by autocast
        self.fsdp = self.distributed and c.fsdp
        if self.fsdp and c.optimizer != "adamw":
            raise TrainError(f"--fsdp supports --optimizer adamw only (torch.optim.AdamW on DTensor shards), got {c.optimizer}")
        if self.fsdp and c.precision == "bf16" and not c.lora_rank:
            self.log("note: --fsdp with bf16 shards float32 parameters and runs bf16 by autocast (torch.optim.AdamW "
                     "on the shards)" + ("; --no-master-weights has no effect there" if not c.master_weights else "")
                     + "; the export is float32")
        bf16_params = c.precision == "bf16" and _compat.supports_master_weights(c.optimizer) and not c.lora_rank and not self.fsdp
        self.master_weights = bf16_params and c.master_weights
        self.param_dtype = torch.bfloat16 if bf16_params else torch.float32
        if c.lora_rank and c.precision == "bf16":
            self.param_dtype = torch.bfloat16  # frozen base in bf16, adapters float32
        self.autocast = c.precision == "bf16" and self.param_dtype == torch.float32
        model.to(device=self.device, dtype=self.param_dtype)
        if hasattr(model, "reset_rope"):  # the rotary cache stays float32 whatever the parameter dtype
            model.reset_rope()
        if c.lora_rank:
            if c.lora_base_bits != 16 and self.fsdp:
                raise TrainError("--lora-base-bits 4/8 (QLoRA) does not combine with --fsdp: use DDP (the default)")
            try:
                if c.lora_base_bits != 16:
                    self.quantized_names = loramod.quantize_base(model, c.lora_base_bits, c.lora_group_size)
                    self.log(f"QLoRA: {len(self.quantized_names)} frozen base linears quantized to int{c.lora_base_bits}")
                self.lora_names = loramod.apply_lora(model, c.lora_rank, c.lora_targets, c.lora_alpha, c.lora_dropout)
            except ValueError as e:
                raise TrainError(str(e)) from None
            if c.precision == "bf16":
                self.autocast = False
        self.raw_model = model
        self._check_fits(model)
        if len(self.data.train) < gb:
            raise TrainError(f"the training split has {len(self.data.train)} rows of {c.seq_len} tokens, fewer than "
                             f"one global batch of {gb} (batch-size {c.batch_size} x grad-accum {c.grad_accum} x "
                             f"{self.world} processes): add data or lower --batch-size/--seq-len")
        if c.activation_checkpointing:
            self._apply_activation_checkpointing(model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # a QLoRA base's int4/int8 weights are buffers of its QuantLinear layers, not parameters: counted apart
        from thrifty.nn import QuantLinear
        self.n_quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))

        # ---- FSDP2 shards the parameters (they become DTensors): before the optimizer sees them
        if self.distributed and c.fsdp:
            from torch.distributed.fsdp import fully_shard
            for layer in self._layers(model):
                fully_shard(layer)
            fully_shard(model)

        # ---- optimizer + schedule
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "lora_" not in n else no_decay).append(p)
        groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if c.lr is None:
            c.lr = 5e-4 if c.lora_rank else (5e-5 if c.model else 1e-3)
        try:
            if self.fsdp:
                self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
            else:
                self.optimizer = _compat.make_optimizer(c.optimizer, groups, lr=c.lr, betas=tuple(c.betas),
                                                        weight_decay=c.weight_decay, master_weights=self.master_weights,
                                                        max_grad_norm=c.grad_clip if c.grad_clip and c.grad_clip > 0 else None)
        except ValueError as e:
            raise TrainError(str(e)) from None
        total = c.steps or 10**9
        warm = c.warmup if c.warmup is not None else default_warmup(c.steps or 2000)
        self.schedule = WarmupCosine(warm, total, c.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)

        # ---- distributed wrappers, compile
        self.model = model
        if self.distributed:
            if not c.fsdp:
                from torch.nn.parallel import DistributedDataParallel as DDP
                self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if c.compile:
            self.model = torch.compile(self.model)
        self.sampler = ResumableSampler(len(self.data.train), gb, seed=c.seed)
        self.step = 0
        self.tokens_seen = 0
        self.nan_skipped = 0
        self._consecutive_nan = 0
        self.elapsed_before = 0.0
        self.budget_steps_final = False  # --time-budget: whether schedule.total is the final step count
        self.flops_per_token = model_flops_per_token(self.model_config, c.seq_len)
        # MFU against the matmul rate of the compute dtype, measured in this run
        self.peak_flops = measured_matmul_flops(self.device, torch.bfloat16 if c.precision == "bf16" else torch.float32)

    @staticmethod
    def _layers(model) -> list[nn.Module]:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise TrainError("the model has no .model.layers / .layers list to shard or checkpoint")
        return list(layers)

    def _apply_activation_checkpointing(self, model) -> None:
        from torch.utils.checkpoint import checkpoint
        for layer in self._layers(model):
            fwd = layer.forward
            layer.forward = (lambda f: (lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k)))(fwd)

    # ---------- checkpoints ----------
    def _ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a killed save leaves only a .tmp-* directory, never a step_*)."""
        return step_dirs(self._ckpt_root(), holding="trainer_state.pt")

    def _latest_checkpoint(self) -> Path | None:
        cks = self._checkpoints()
        latest = cks[-1] if cks else None
        # a save is renamed into place whole, so a step_* without trainer_state.pt was damaged by hand: say so
        newer = [d for d in step_dirs(self._ckpt_root()) if step_of(d) > (step_of(latest) if latest else -1)]
        if newer and self.cfg.resume and not self._noted_damaged:
            self._noted_damaged = True
            self.log(f"resume: note: {', '.join(d.name for d in newer)} in {self._ckpt_root()} hold(s) no "
                     f"trainer_state.pt (damaged): skipped, resuming from {latest.name if latest else 'nothing'}")
        return latest

    def _remove_stale_temps(self) -> None:
        """Removes what a killed run was writing (checkpoints/.tmp-step_*, .tmp-export-*): never read, only in the way."""
        for d in (self._ckpt_root(), self.run_dir):
            if d.is_dir():
                for p in d.glob(".tmp-*"):
                    if p.name == f".tmp-restore-{os.getpid()}":  # this start's own snapshot of RUN_DIR
                        continue
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)

    def _full_state(self):
        """(model state dict in HF names with LoRA merged, lora state, optimizer state) on every rank."""
        c = self.cfg
        if self.distributed and c.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = get_model_state_dict(self.raw_model, options=opts)
            osd = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        else:
            msd = self.raw_model.state_dict()
            osd = self.optimizer.state_dict()
        return msd, osd

    def _export_model(self, msd: dict, dest: Path) -> None:
        """config.json + model.safetensors (LoRA merged) + tokenizer files into ``dest``."""
        Llama, _, _ = _compat.model_api()
        if self.cfg.lora_rank and self.cfg.lora_base_bits != 16:  # QLoRA: dequantized base + B @ A
            msd = loramod.merged_state_dict(self.raw_model)
        elif self.cfg.lora_rank:
            merged = {}
            scale = {n: m.scale for n, m in loramod.lora_modules(self.raw_model).items()}
            for k, v in msd.items():
                if ".lora_" in k:
                    continue
                merged[k.replace(".base.", ".")] = v
            for n, s in scale.items():
                w = msd[f"{n}.base.weight"]
                merged[f"{n}.weight"] = (w.float() + s * (msd[f"{n}.lora_B"].float() @ msd[f"{n}.lora_A"].float())).to(w.dtype)
            msd = merged
        mcfg = self.model_config
        tied = getattr(mcfg, "tie_word_embeddings", False)
        if tied and self.cfg.lora_rank and "lm_head" in loramod.lora_modules(self.raw_model):
            # an adapter on a tied LM head changes the head, not the embedding: export them untied
            mcfg, tied = copy.copy(mcfg), False
            mcfg.tie_word_embeddings = False
        with torch.device("meta"):
            shell = Llama(mcfg)
        shell.load_state_dict({k: v.detach().cpu() for k, v in msd.items()}, strict=False, assign=True)
        if tied:
            shell.lm_head.weight = shell.model.embed_tokens.weight
        left = [n for n, p in shell.named_parameters() if p.is_meta]
        if left:
            raise TrainError(f"export: parameters missing from the state dict: {left[:4]}")
        shell.save_pretrained(str(dest))
        tokmod.save_tokenizer(self.tokenizer, dest, source=self.run_dir / "tokenizer.json")  # its config kept
        # the --model's generation defaults: its extra stop tokens (Llama 3 Instruct's <|eot_id|>) live only there
        gen = Path(self.cfg.model) / "generation_config.json" if self.cfg.model else None
        if gen is not None and gen.is_file():
            shutil.copyfile(gen, dest / "generation_config.json")

    def save_checkpoint(self) -> Path | None:
        msd, osd = self._full_state()
        if not self.is_main:
            self._barrier()
            return None
        root = self._ckpt_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp-step_{self.step:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self._export_model(msd, tmp)
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "nan_skipped": self.nan_skipped,
            "elapsed": self.elapsed_before + (time.perf_counter() - self._t_start),
            "optimizer": osd, "scheduler": self.scheduler.state_dict(), "schedule_total": self.schedule.total,
            "budget_final": self.time_budget if self.budget_steps_final else None,
            "sampler": self.sampler.state_dict(), "config": asdict(self.cfg), "world_size": self.world,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        if self.cfg.lora_rank:
            state["lora"] = {k: v.detach().cpu() for k, v in msd.items() if ".lora_" in k}
        torch.save(state, tmp / "trainer_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        self._ckpts_written += 1
        if getattr(self, "_snapshot", None) is not None:  # the run has started: no restore from here on
            self._snapshot.discard()
        _fsync_dir(root)  # the rename itself survives a power cut, not only a kill
        cks = step_dirs(root)
        for old in cks[:-max(1, self.cfg.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _barrier(self):
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def _rank0(self, *values: float) -> list[float]:
        """``values`` as rank 0 has them, on every rank (one broadcast). Decisions taken from a clock, which
        each process reads at its own moment, must be one decision: otherwise, at the end of a --time-budget,
        one rank saves and exports while another starts a step, and both wait in different collectives."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def _saved_train_config(self, run_dir: Path) -> dict | None:
        """The options a run was started with (its train_config.json); None for an older or damaged run directory
        (the given options then stand)."""
        try:
            saved = json.loads((run_dir / "train_config.json").read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) else None

    def _resume_run_options(self) -> None:
        """--resume --out RUN without --model / --steps / --time-budget / the step's shape: the run's own (a bare
        --resume of a --model run built the default preset and a new tokenizer, then failed on the tokenizer's
        mismatch; it trained for the default 10 minutes instead of to the run's --steps, and took the default
        --batch-size and --seq-len)."""
        c = self.cfg
        saved = self._saved_train_config(Path(c.out)) if c.resume and c.out else None
        if saved is None:
            return
        was = saved.get("model")
        if c.model is None and isinstance(was, str):
            if not Path(was).exists():
                raise TrainError(f"--resume: {c.out} was trained with --model {was}, which is not there now "
                                 "(another working directory?): pass --model")
            self.log(f"resume: no --model given: using the run's own {was} (train_config.json)")
            c.model = was
        for name in ("batch_size", "grad_accum", "seq_len"):  # the shape of a step, left at its default: the run's
            was = saved.get(name)
            if name not in self._options_set and isinstance(was, int) and not isinstance(was, bool) \
                    and was != getattr(c, name):
                self.log(f"resume: --{name.replace('_', '-')} not given (or the default): using the run's own {was}")
                setattr(c, name, was)
        if c.steps is None and c.time_budget is None:
            if isinstance(saved.get("steps"), int) and not isinstance(saved["steps"], bool):
                c.steps = saved["steps"]
                self.log(f"resume: no --steps / --time-budget given: going on to the run's own --steps {c.steps}")
            elif saved.get("time_budget") is not None:
                c.time_budget = saved["time_budget"]
                self.log(f"resume: no --steps / --time-budget given: the run's own --time-budget {c.time_budget}")

    def _resume_data_options(self) -> None:
        """--resume without --data / --tokenizer: the run's own (train_config.json), not the embedded corpus and a
        freshly trained tokenizer, which cannot match the checkpoint's embeddings."""
        c = self.cfg
        saved = self._saved_train_config(self.run_dir)
        if saved is None:
            return
        for name in ("data", "tokenizer"):
            was = saved.get(name)
            if getattr(c, name) is not None or not isinstance(was, str):
                continue
            if not Path(was).exists():
                raise TrainError(f"--resume: {self.run_dir} was trained with --{name} {was}, which is not there now "
                                 f"(another working directory?): pass --{name}")
            self.log(f"resume: no --{name} given: using the run's own {was} (train_config.json)")
            setattr(c, name, was)

    # Options a checkpoint's state is tied to: another value on --resume cannot continue its trajectory (the
    # optimizer state or the adapters would not fit, or would be read as something else).
    def _check_resume_options(self, path: Path, saved: dict) -> None:
        c = self.cfg

        def norm(name, v):
            if name == "lora_targets":
                v = v.split(",") if isinstance(v, str) else (v or ())
                return tuple(t.strip() for t in v if t and t.strip())
            return v

        names = ["optimizer", "lora_rank"]
        if c.lora_rank:
            names += ["lora_targets", "lora_base_bits"] + (["lora_group_size"] if c.lora_base_bits == 4 else [])
        if c.model is None and saved.get("model") is None:
            names += ["preset", "model_overrides"]
        for name in names:
            if name not in saved:
                continue
            was, now = norm(name, saved[name]), norm(name, getattr(c, name))
            if was != now:
                flag = name if name == "model_overrides" else "--" + name.replace("_", "-")
                show = (lambda v: ",".join(v)) if name == "lora_targets" else repr
                raise TrainError(f"--resume: {path} was trained with {flag} {show(was)}, this run asks for "
                                 f"{show(now)}: resume with the same {flag}, or start a new --out (--model {path} "
                                 "fine-tunes from that checkpoint)")

    def _note_resume_changes(self, path: Path, state: dict) -> None:
        """What --resume continues differently from the run it resumes, said in the log: another global batch
        (--batch-size is per process: the same value on another number of processes changes it), a longer
        --steps (the schedule's total stays the checkpoint's)."""
        c, saved = self.cfg, state.get("config") or {}
        world = state.get("world_size")
        if world and isinstance(saved.get("batch_size"), int) and isinstance(saved.get("grad_accum"), int):
            was = saved["batch_size"] * saved["grad_accum"] * world
            if was != self.global_batch:
                per = was / (c.grad_accum * self.world)
                hint = (f"--batch-size {int(per)} keeps it on {self.world} process(es)" if per == int(per) else
                        f"no --batch-size on {self.world} process(es) with --grad-accum {c.grad_accum} gives {was}")
                self.log(f"resume: note: {path} was trained with a global batch of {was} rows ({saved['batch_size']} "
                         f"x grad-accum {saved['grad_accum']} x {world} process(es)), this run takes {self.global_batch}:"
                         f" the loss trajectory will differ from the uninterrupted run's ({hint})")
        # the optimizer's and scheduler's state carry these: another value on the command line is not applied, and
        # the run's records (train_config.json) keep the values the run goes on with
        flags = {"lr": "--lr", "weight_decay": "--weight-decay", "betas": "betas", "min_lr_ratio": "min_lr_ratio"}
        for name, flag in flags.items():  # (betas and min_lr_ratio: TrainConfig fields, no command-line flag)
            if name not in saved or saved[name] is None:
                continue
            was, now = saved[name], getattr(c, name)
            same = (tuple(map(float, was)) == tuple(map(float, now))) if name == "betas" else float(was) == float(now)
            if not same and name in self._options_set:
                self.log(f"resume: note: {flag} {now} is not applied: the optimizer and the learning-rate schedule "
                         f"continue with the checkpoint's {was} (a new --out, or --model {path} to fine-tune from "
                         "it, takes another)")
            if not same:  # the run's records say what it goes on with
                setattr(c, name, tuple(was) if name == "betas" else was)
        budget_was = saved.get("time_budget")
        if c.time_budget is not None and budget_was is not None and parse_duration(budget_was) != self.time_budget:
            self.log(f"resume: note: --time-budget {c.time_budget} is not the checkpoint's {budget_was}: the schedule's "
                     "total is estimated anew for this budget, so the learning rate continues on another warmup + "
                     "cosine length from here (--steps keeps the checkpoint's schedule)")
        if c.steps is not None and state.get("schedule_total") not in (None, c.steps) and saved.get("steps") != c.steps:
            self.log(f"resume: note: the learning-rate schedule keeps the checkpoint's total of "
                     f"{state['schedule_total']} steps (warmup + cosine); --steps {c.steps} only moves where the run "
                     "stops")

    def load_checkpoint(self, path: Path) -> None:
        ck_tok = path / "tokenizer.json"
        if ck_tok.is_file() and tokmod.load_tokenizer(ck_tok).get_vocab() != self.tokenizer.get_vocab():
            # the model's embeddings belong to the checkpoint's tokenizer: going on with another is garbage
            raise TrainError(f"--resume: the tokenizer differs from the one {path} was trained with (the data, "
                             "--tokenizer or the data filters changed since): resume with the same --data and "
                             "--tokenizer, or use another --out")
        try:
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # torch's zip reader raises RuntimeError
            raise TrainError(f"checkpoint {path}: corrupt or truncated trainer_state.pt ({str(e).splitlines()[0]}); "
                             f"remove {path} to resume from the checkpoint before it") from None
        self._check_resume_options(path, state.get("config") or {})
        self._note_resume_changes(path, state)
        from safetensors.torch import load_file
        if self.cfg.lora_rank:
            loramod.load_lora_state_dict(self.raw_model, state["lora"])
        else:
            try:
                sd = load_file(str(path / "model.safetensors"))
            except (SafetensorError, FileNotFoundError) as e:
                what = "missing" if isinstance(e, FileNotFoundError) else f"corrupt or truncated ({e})"
                raise TrainError(f"checkpoint {path}: model.safetensors {what}; remove {path} to resume from the "
                                 "checkpoint before it") from None
            try:
                if self.distributed and self.cfg.fsdp:
                    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
                    set_model_state_dict(self.raw_model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
                    missing = unexpected = []
                else:
                    missing, unexpected = self.raw_model.load_state_dict(sd, strict=False)
            except RuntimeError as e:  # size mismatches: another --preset / --model than the checkpoint's
                raise TrainError(f"--resume: checkpoint {path} does not match the model this run builds (--preset, "
                                 f"--model or the model config changed since): {str(e).splitlines()[-1].strip()}") from None
            missing = [m for m in missing if m != "lm_head.weight"]
            if missing or unexpected:
                raise TrainError(f"checkpoint {path}: does not match the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
        if self.distributed and self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            try:
                set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            except KeyError as e:  # a state dict keyed by parameter index (DDP / one process), not by name
                raise TrainError(f"--resume --fsdp: checkpoint {path} was written without --fsdp (its optimizer state "
                                 f"has no {e}); resume it without --fsdp (one process or DDP)") from None
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        asked_warmup = self.cfg.warmup
        self.schedule.total = state["schedule_total"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.schedule.total = state["schedule_total"]
        if asked_warmup is not None and asked_warmup != self.schedule.warmup:
            self.log(f"resume: note: --warmup {asked_warmup} is not applied: the schedule continues with the "
                     f"checkpoint's warmup of {self.schedule.warmup} steps")
            self.cfg.warmup = self.schedule.warmup  # (None stays None: a --time-budget run re-derives its warmup)
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens_seen, self.nan_skipped = state["step"], state["tokens_seen"], state["nan_skipped"]
        self.elapsed_before = state["elapsed"]
        # the step count a --time-budget run settled on holds for the same budget (another one: estimated anew)
        self.budget_steps_final = self.time_budget is not None and state.get("budget_final") == self.time_budget
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.log(f"resumed from {path} at step {self.step}")

    # ---------- steps ----------
    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, b: dict, model=None) -> torch.Tensor:
        """The loss of batch b through `model` (default: the model being trained, wrapped as for training)."""
        model = self.model if model is None else model
        dev = self.device
        ids, pos, lab = b["input_ids"], b["positions"], b["labels"]
        if self.thrifty_model:  # thrifty.models takes packed documents as one flat (tokens,) sequence
            ids, pos, lab = ids.reshape(-1), pos.reshape(-1), lab.reshape(-1)
        with self._autocast():
            if self.thrifty_model and "max_seqlen" in b:  # known on the host: no read-back of cu_seqlens
                return model(ids.to(dev), positions=pos.to(dev), labels=lab.to(dev),
                             cu_seqlens=b["cu_seqlens"].to(dev), max_seqlen=int(b["max_seqlen"]))
            return model(ids.to(dev), positions=pos.to(dev), labels=lab.to(dev), cu_seqlens=b["cu_seqlens"].to(dev))

    def _no_sync(self, last: bool):
        if last or not self.distributed:
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.raw_model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self) -> dict:
        c = self.cfg
        batch = self.sampler.next_batch()
        # the loss is the mean over every target of the global batch, whatever the split across ranks
        # and micro-batches: each micro-batch loss is weighted by its share of the targets.
        ds = self.data.train
        n_targets = [int((ds.batch([i])["labels"][:, 1:] != IGNORE_INDEX).sum()) for i in batch]
        total = max(1, sum(n_targets))
        mine = ResumableSampler.shard(list(range(len(batch))), self.rank, self.world)
        micro = [mine[k * c.batch_size:(k + 1) * c.batch_size] for k in range(c.grad_accum)]
        loss_acc = torch.zeros((), device=self.device, dtype=torch.float32)
        if self.distributed and c.fsdp:
            self.raw_model.set_requires_gradient_sync(True)
        for k, idx in enumerate(micro):
            b = ds.batch([batch[i] for i in idx])
            w = sum(n_targets[i] for i in idx) / total
            with self._no_sync(k == len(micro) - 1):
                if self.distributed and c.fsdp:
                    self.raw_model.set_requires_gradient_sync(k == len(micro) - 1)
                loss = self._forward_loss(b)
                if self.step + 1 in c.inject_nan_steps:
                    loss = loss * float("nan")
                (loss.float() * (w * self.world)).backward()
            loss_acc += loss.detach().float() * w
        if self.distributed:
            import torch.distributed as dist
            dist.all_reduce(loss_acc)
        loss_val = float(loss_acc)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.fsdp:  # torch.optim.AdamW over DTensor shards: torch's clipping, then a host-side check
            params = [p for p in self.raw_model.parameters() if p.requires_grad]
            gnorm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip and c.grad_clip > 0 else float("inf"))
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            skipped = not (math.isfinite(loss_val) and math.isfinite(gnorm))
            if not skipped:
                self.optimizer.step()
        elif math.isfinite(loss_val):
            # thrifty's fused optimizer: one fused grad norm clips inside the step (same coefficient as
            # clip_grad_norm_, min(1, clip / (norm + 1e-6))) and skips the step on non-finite grads
            self.optimizer.step()
            gnorm = float(self.optimizer.last_grad_norm)
            skipped = self.optimizer.last_step_skipped
        else:
            gnorm, skipped = float("nan"), True
        if skipped:
            self.nan_skipped += 1
            self._consecutive_nan += 1
        else:
            self._consecutive_nan = 0
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step is counted and logged: torch's ordering warning
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        self.tokens_seen += len(batch) * c.seq_len
        return {"loss": loss_val, "grad_norm": gnorm, "lr": lr, "skipped": skipped}

    @torch.no_grad()
    def evaluate(self, model=None, batches: int | None = None) -> dict:
        """Token-weighted validation loss over the first `batches` batches (default cfg.eval_batches) of
        `model` (default: the model being trained; another one, a quantized copy say, is measured the same
        way). The model's train/eval mode is restored afterwards."""
        c = self.cfg
        ds = self.data.val
        if len(ds) == 0:
            return {}
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        tot, n = 0.0, 0
        # The first `batches` global batches (batch-size x grad-accum x processes rows): the same rows, so the same
        # loss, however the global batch is split; each process scores its share, batch_size rows per forward, and
        # the sums are reduced. Every process runs the same number of forwards (DDP and FSDP forwards are
        # collectives): one left without rows scores a row at weight 0.
        rows = list(range(min(len(ds), (c.eval_batches if batches is None else batches) * self.global_batch)))
        mine = ResumableSampler.shard(rows, self.rank, self.world)
        most = -(-len(rows) // self.world)  # the largest share: ceil(rows / world)
        n_fwd = -(-most // c.batch_size)
        for k in range(n_fwd):
            part = mine[k * c.batch_size:(k + 1) * c.batch_size]
            b = ds.batch(part or [0])
            m = int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) if part else 0
            loss = self._forward_loss(b, model)
            tot += float(loss) * m
            n += m
        if self.distributed:
            import torch.distributed as dist
            sums = torch.tensor([tot, n], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            tot, n = sums.tolist()
        model.train(was_training)
        vl = tot / max(1, n)
        return {"val_loss": vl, "val_ppl": math.exp(min(vl, 50))}

    # ---------- the loop ----------
    def train(self) -> dict:
        """Runs the whole job; returns a summary dict (final loss, val loss, paths, counters)."""
        c = self.cfg
        rd0 = self.run_dir = self._run_dir()
        created = not rd0.exists()
        # what RUN_DIR held before: a failed start puts it back as it was (nothing half-written)
        snap = self._snapshot = _RunDirSnapshot(rd0) if self.is_main and not created and rd0.is_dir() else None
        try:
            try:
                self.setup()
                if c.resume:
                    self.load_checkpoint(self._latest_checkpoint())
            except (TrainError, DataError, OSError, ValueError) as e:
                self._cleanup_failed(created, snap)
                if isinstance(e, TrainError):
                    raise
                raise TrainError(str(e)) from e
            except BaseException:
                self._cleanup_failed(created, snap)
                raise
            if c.resume and self._finished():
                return self._nothing_to_do()
            try:
                return self._loop()
            except TrainError:
                # e.g. the first step ran out of memory: a run that wrote no checkpoint leaves RUN_DIR as it was
                if not self._ckpts_written:
                    self._cleanup_failed(created, snap)
                raise
        finally:
            if snap is not None:
                snap.discard()

    def _finished(self) -> bool:
        """Whether the resumed checkpoint already reached the end of the schedule (--steps or --time-budget)."""
        if self.cfg.steps is not None:
            return self.step >= self.cfg.steps
        if self.time_budget is not None and self.budget_steps_final and self.step >= self.schedule.total:
            return True
        return self.time_budget is not None and self.elapsed_before >= self.time_budget

    def _nothing_to_do(self) -> dict:
        """A resume with no step left: the export and summary.json stay as they are (written again when a
        kill between the last checkpoint and the export left them missing, or left an earlier run's export:
        a finished run resumed with more --steps and killed after its last checkpoint)."""
        c, rd = self.cfg, self.run_dir
        goal = f"{c.steps}" if c.steps is not None else f"the --time-budget of {self.time_budget:.0f} s"
        self.log(f"run already at step {self.step} of {goal}: nothing to do"
                 + (" (raise --steps to train further)" if c.steps is not None else ""))
        summary = rd / "summary.json"
        if summary.is_file() and (rd / "config.json").is_file():
            try:
                done = json.loads(summary.read_text())
            except ValueError:
                done = None
            if isinstance(done, dict) and done.get("steps") == self.step:
                return done
        rows = _metrics_rows(rd / "metrics.jsonl")
        last = [r for r in rows if r.get("step") == self.step]
        result = {"run_dir": str(rd), "steps": self.step,
                  "final_loss": next((r["loss"] for r in reversed(last) if "loss" in r), None),
                  "nan_skipped": self.nan_skipped, "tokens": self.tokens_seen}
        result.update({k: r[k] for r in last for k in ("val_loss", "val_ppl") if k in r})
        self._write_export(result, rd / "metrics.jsonl")
        return result

    def _write_export(self, result: dict, metrics_path: Path) -> None:
        """The final model (Hugging Face format), loss curve and summary.json in the run directory."""
        c, rd = self.cfg, self.run_dir
        msd, _ = self._full_state()
        if self.is_main:
            tmp = rd / f".tmp-export-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            self._export_model(msd, tmp)
            for f in tmp.iterdir():
                os.replace(f, rd / f.name)
            tmp.rmdir()
            if c.plot and metrics_path.is_file():
                if importlib.util.find_spec("matplotlib") is None:  # a finished run does not fail for its picture
                    self.log("note: no loss_curve.png: matplotlib is not installed (pip install matplotlib)")
                else:
                    self.plot_loss(metrics_path, rd / "loss_curve.png")
            (rd / "summary.json").write_text(json.dumps(finite_or_none(result), indent=1, allow_nan=False))
            fl = result.get("final_loss")
            self.log(f"done: {self.step} steps, final train loss " + (f"{fl:.4f}" if fl is not None else "unknown")
                     + (f", val loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.2f})" if "val_loss" in result else "")
                     + f"; model in {rd} (Hugging Face format), checkpoints in {self._ckpt_root()}")
        self._barrier()

    def _cleanup_failed(self, created: bool, snap: _RunDirSnapshot | None = None) -> None:
        rd = getattr(self, "run_dir", None) or (Path(self.cfg.out) if self.cfg.out else None)
        if rd is None or not rd.exists() or not self.is_main:
            return
        if created:
            shutil.rmtree(rd, ignore_errors=True)
        elif snap is not None and rd.is_dir():
            snap.restore()

    def _loop(self) -> dict:
        c = self.cfg
        rd = self.run_dir
        if self.is_main:
            rd.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps()
            # temp + rename, never in place: a failure before the first checkpoint restores the old files
            replace_text(rd / "train_config.json", json.dumps(asdict(c), indent=1, default=str))
        metrics_path = rd / "metrics.jsonl"
        if self.is_main:
            keep = [ln for ln, row in _metrics_lines(metrics_path) if row.get("step", 0) <= self.step] if c.resume else []
            replace_text(metrics_path, "".join(ln + "\n" for ln in keep))
        self._consecutive_nan = 0
        eval_every = c.eval_every or max(1, (c.steps or 500) // 10)
        mc = self.model_config
        quantized = f", {self.n_quantized / 1e6:.2f}M quantized frozen" if self.n_quantized else ""
        self.log(f"model: {(self.n_params + self.n_quantized) / 1e6:.2f}M parameters ({self.n_trainable / 1e6:.2f}M "
                 f"trainable{quantized}), "
                 f"{mc.num_hidden_layers} layers x {mc.hidden_size}, vocab {mc.vocab_size}; "
                 f"{'thrifty' if self.thrifty_model else 'stand-in'} model, optimizer {type(self.optimizer).__module__}."
                 f"{type(self.optimizer).__name__}; precision {c.precision} "
                 f"({'bf16 params + fp32 master weights' if self.master_weights else 'autocast over fp32 params' if self.autocast else 'bf16 params, no master weights' if self.param_dtype == torch.bfloat16 and not c.lora_rank else str(self.param_dtype)}); "
                 f"{self.world} process(es) on {self.device}{' FSDP2' if c.fsdp and self.distributed else ' DDP' if self.distributed else ''}; "
                 f"global batch {self.global_batch} x {c.seq_len} tokens")
        from tqdm import tqdm
        self._t_start = time.perf_counter()
        total_steps = c.steps
        if total_steps is None and self.budget_steps_final:  # resumed: the same schedule as before the kill
            total_steps = self.schedule.total
        t_ref = step_ref = None  # --time-budget: start of the steady-state rate measurement
        next_estimate = 1
        self._bar = tqdm(total=total_steps, initial=self.step, disable=not (c.progress and self.is_main),
                         dynamic_ncols=True, file=sys.stderr, unit="step")
        last_good = None
        start_step = self.step
        out = {"loss": None}
        result = {"run_dir": str(rd)}
        t_window, tok_window = time.perf_counter(), 0
        val = {}
        stopped_early = False
        mf = open(metrics_path, "a") if self.is_main else None
        try:
            self.model.train()
            while True:
                if total_steps is not None and self.step >= total_steps:
                    break
                if self.time_budget is not None and c.steps is None and not self.budget_steps_final:
                    now = time.perf_counter()
                    if self.step == start_step + BUDGET_WARMUP_STEPS:
                        t_ref, step_ref = now, self.step
                    elif step_ref is not None and self.step - step_ref >= next_estimate:
                        # the steady rate (evaluations and saves in the window included) over the time left
                        per = (now - t_ref) / (self.step - step_ref)
                        elapsed = self.elapsed_before + now - self._t_start
                        total_steps = max(self.step + 1, self.step + int((self.time_budget - elapsed) / per))
                        # the share of what this process has of the budget (a resume starts with part of it spent)
                        final = (now - self._t_start >= BUDGET_ESTIMATE_FRACTION
                                 * (self.time_budget - self.elapsed_before))
                        total, final = self._rank0(total_steps, final)  # one schedule for all ranks
                        total_steps, final = int(total), bool(final)
                        self.schedule.total = total_steps
                        if c.warmup is None:  # a short budget must still reach the peak lr
                            self.schedule.warmup = default_warmup(total_steps)
                        self.budget_steps_final = final
                        next_estimate *= 2
                        self._bar.total = total_steps
                        self._bar.refresh()
                try:
                    out = self.train_step()
                except torch.OutOfMemoryError as e:
                    raise TrainError(f"out of memory in a training step (micro-batch {c.batch_size} x {c.seq_len}): lower "
                                     "--batch-size (raise --grad-accum), --seq-len, or add --activation-checkpointing") from e
                tok_window += self.global_batch * c.seq_len
                now = time.perf_counter()
                tps = tok_window / max(1e-9, now - t_window)
                mfu = tps * self.flops_per_token / (self.peak_flops * self.world)  # global tokens, every process's peak
                row = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "tokens_per_s": tps, "mfu": mfu,
                       "grad_norm": out["grad_norm"], "tokens": self.tokens_seen,
                       "elapsed_s": self.elapsed_before + now - self._t_start}
                if out["skipped"]:
                    row["skipped"] = True
                    self.log(f"step {self.step}: non-finite loss/gradients ({out['loss']}), step skipped "
                             f"({self.nan_skipped} so far)")
                done = total_steps is not None and self.step >= total_steps
                if not done and self.time_budget is not None:  # rank 0's clock decides for every rank
                    time_up = self.elapsed_before + time.perf_counter() - self._t_start >= self.time_budget
                    done = bool(self._rank0(time_up)[0])
                evaluated = False
                if (self.step % eval_every == 0 or done) and self._consecutive_nan < c.max_nan_steps:
                    t_eval = time.perf_counter()
                    val = self.evaluate()
                    t_window += time.perf_counter() - t_eval  # tokens/s counts training time only
                    evaluated = bool(val)
                    if val:  # one JSON object per step: the validation metrics join that step's row
                        row.update(val)
                        self.log(f"step {self.step}: train loss {out['loss']:.4f}, val loss {val['val_loss']:.4f}, "
                                 f"perplexity {val['val_ppl']:.2f}")
                if mf and (self.step % c.log_every == 0 or out["skipped"] or evaluated):
                    mf.write(json_line(row) + "\n")
                    mf.flush()
                self._bar.update(1)
                self._bar.set_postfix_str(f"loss {out['loss']:.3f} | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}%"
                                          + (f" | val {val['val_loss']:.3f}" if val else ""), refresh=False)
                if self.step % 10 == 0:
                    t_window, tok_window = time.perf_counter(), 0
                if self._consecutive_nan >= c.max_nan_steps:
                    raise TrainStopped(f"stopped: {self._consecutive_nan} consecutive steps with a non-finite loss "
                                       f"(step {self.step}); the last good checkpoint is "
                                       f"{last_good or self._latest_checkpoint() or 'none (no checkpoint was written)'}")
                if c.save_every and self.step % c.save_every == 0 and self._checkpoint_is_good():
                    t_save = time.perf_counter()
                    last_good = self.save_checkpoint()
                    t_window += time.perf_counter() - t_save
                if c.stop_at_step is not None and self.step >= c.stop_at_step:
                    stopped_early = True
                    break
                if done:
                    break
        finally:
            self._bar.close()
            self._bar = None
            if mf:
                mf.close()
        result.update(steps=self.step, final_loss=out["loss"] if self.step else None, nan_skipped=self.nan_skipped,
                      tokens=self.tokens_seen, **val)
        if stopped_early:
            return result
        if not c.save_every or self.step % c.save_every != 0:  # None / 0: only this one at the end
            last_good = self.save_checkpoint() if self._checkpoint_is_good() else last_good
        self._write_export(result, metrics_path)
        return result

    def _checkpoint_is_good(self) -> bool:
        """Whether the state now makes a good checkpoint: after a finite step, or after skipped non-finite
        steps (they left the weights and optimizer as the last good step did) while the weights are finite.
        A skipped last step wrote no checkpoint at all, so the run could not be resumed."""
        if self._consecutive_nan == 0:
            return True
        # every rank takes the same branch (the skip decision is global); a DTensor's all() reduces over ranks
        return all(bool(torch.isfinite(p.detach()).all()) for p in self.raw_model.parameters())

    @staticmethod
    def plot_loss(metrics_path: Path, png: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = _metrics_rows(metrics_path)
        tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
        va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = png.with_name("." + png.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, png)
