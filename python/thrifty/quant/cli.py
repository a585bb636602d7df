"""`thrifty quantize MODEL_DIR OUT_DIR --bits 4 --group-size 128 --method gptq`

Works on the safetensors level of a Hugging Face Llama-style directory (config.json + *.safetensors,
sharded index included): every 2-D weight named *_proj.weight (not the LM head, not embeddings) is
quantized; every other tensor is copied unchanged. OUT_DIR gets model.safetensors (thrifty format
version 1: <layer>.qweight / .scales / .zeros / .perm, metadata "format"="thrifty-quant" and the per-layer
config), config.json with a "quantization_config" block, and the tokenizer files.

GPTQ needs calibration activations: the float model is run through thrifty.models.Llama (no transformers
needed; transformers' AutoModelForCausalLM for other architectures, when installed) on text from
--calibration FILE or an embedded default corpus, tokenized with the directory's tokenizer.json. A directory
without a tokenizer (and no --calibration FILE) calibrates on seeded random token ids from the vocabulary.

Exit codes: 0 done, 2 bad input (one line on stderr; OUT_DIR untouched: every input is read and checked
before anything is written, and the outputs go to a temporary directory moved into place at the end).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

DEFAULT_CORPUS = """\
The history of computing is a history of making expensive things cheap. Early machines filled rooms and
served a handful of scientists; each generation since has put more arithmetic into less silicon, and
software followed the hardware into every office, pocket and appliance.
A language model predicts the next token of a text from the tokens before it. Trained on enough text it
learns spelling, grammar, facts and some reasoning, and serving it costs memory bandwidth above all:
every weight is read once for every generated token, so smaller weights mean faster answers.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Rivers carry water from the mountains to the sea, shaping valleys over millions of years. Cities grew
along them because water meant trade, food and power; bridges, mills and harbours followed.
In mathematics a group is a set with an associative operation, an identity element and inverses. The
integers under addition form a group; the rotations of a square form a smaller one with eight elements
when reflections are included.
Bread needs flour, water, salt and yeast. Mix, knead until smooth, let it rise until doubled, shape it,
let it rise again and bake in a hot oven until the crust is brown and the loaf sounds hollow.
"""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "vocab.json", "merges.txt")


class QuantizeError(Exception):
    """Bad input to `thrifty quantize`: main prints it as one line on stderr and returns 2."""


def _error(msg) -> int:
    print(f"thrifty quantize: error: {msg}", file=sys.stderr)
    return 2


_DEFAULTS = {"group_size": 128, "calibration_tokens": 4096, "seq_len": 512, "damp": 0.01}


def add_arguments(parser) -> None:
    d = _DEFAULTS
    parser.add_argument("model_dir", help="Hugging Face Llama-style directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="where the quantized model is written")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8], help="weight bits (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=d["group_size"],
                        help="bits=4 group size, a multiple of 32 (default: %(default)s; bits=8 is per output channel)")
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                        help="rtn: round to nearest; gptq: error-compensated with calibration data "
                        "(default: %(default)s)")
    parser.add_argument("--act-bits", type=int, default=16, choices=[16, 8],
                        help="8: W8A8 (bits=8 only) (default: %(default)s)")
    parser.add_argument("--calibration", help="text file for GPTQ calibration (default: an embedded corpus, or random "
                        "token ids when MODEL_DIR has no tokenizer)")
    parser.add_argument("--calibration-tokens", type=int, default=d["calibration_tokens"],
                        help="gptq: calibration tokens (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=d["seq_len"],
                        help="gptq: calibration sequence length (default: %(default)s)")
    parser.add_argument("--damp", type=float, default=d["damp"],
                        help="gptq: Hessian dampening, a fraction of its mean diagonal (default: %(default)s)")
    parser.add_argument("--no-act-order", action="store_true",
                        help="gptq: quantize columns in their order, not by decreasing Hessian diagonal")


def _weight_files(model_dir: Path) -> list[Path]:
    """The files from_pretrained and transformers read (model.safetensors before a possibly stale index)."""
    from thrifty.models.hf import weight_files
    try:
        return weight_files(model_dir)
    except (ValueError, FileNotFoundError) as e:
        raise QuantizeError(str(e)) from None


def _read_config(model_dir: Path) -> dict:
    """config.json, parsed before anything is computed or written (OUT_DIR gets a copy of it)."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise QuantizeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QuantizeError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_not_quantized(src: Path, config: dict) -> None:
    """A checkpoint that is quantized already (its config.json's quantization_config) is refused by name: its
    *_proj weights are packed codes, not matrices to quantize."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return
    method = qc.get("quant_method", "unknown")
    if method == "thrifty":
        what = ", ".join(f"{k}={qc[k]}" for k in ("bits", "group_size", "method", "act_bits") if k in qc)
        raise QuantizeError(f"{src} is quantized already (by thrifty quantize: {what or 'no settings recorded'}); "
                            "quantize the float model it came from instead")
    raise QuantizeError(f"{src} is quantized already (quantization_config.quant_method = {method!r}); thrifty "
                        "quantize reads float checkpoints (GPTQ / AWQ layers import with "
                        "thrifty.nn.QuantLinear.from_gptq / from_awq)")


def _note_unloadable(config: dict) -> None:
    """OUT_DIR keeps MODEL_DIR's architecture: say when thrifty.models.Llama (from_pretrained,
    thrifty generate) will not load it, and how its layers load instead."""
    from thrifty.models import ConfigError, LlamaConfig
    try:
        LlamaConfig.from_dict(config)
    except (ConfigError, ValueError, TypeError) as err:
        print(f"thrifty quantize: note: thrifty.models.Llama cannot load this architecture ({err}), so "
              "Llama.from_pretrained and thrifty generate will not load OUT_DIR; load its layers into your own "
              "model with thrifty.quant.load_quantized(model, 'OUT_DIR/model.safetensors')", file=sys.stderr,
              flush=True)


def _check_out_dir(src: Path, out: Path) -> None:
    """OUT_DIR must be creatable (or an existing directory) and must not be MODEL_DIR: checked before the
    quantization work, which can take minutes."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise QuantizeError(f"OUT_DIR {str(out)!r} exists and is not a directory")
        if os.path.samefile(out, src):
            raise QuantizeError(f"OUT_DIR {str(out)!r} is MODEL_DIR: the quantized model would overwrite the "
                                "float one; pick another directory")
        return
    for parent in out.absolute().parents:  # the nearest existing ancestor is where OUT_DIR gets created
        if parent.exists():
            if not parent.is_dir():
                raise QuantizeError(f"cannot create OUT_DIR {str(out)!r}: {str(parent)!r} is not a directory")
            return


def _calibration_text(args) -> str:
    if not args.calibration:
        return DEFAULT_CORPUS
    cal = Path(args.calibration)
    if not cal.is_file():
        raise QuantizeError(f"--calibration: no such file {str(cal)!r}")
    try:
        text = cal.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise QuantizeError(f"--calibration: cannot read {str(cal)!r} ({e})") from None
    if not text.strip():
        raise QuantizeError(f"--calibration: {str(cal)!r} is empty")
    return text


def _load_tensors(files: list[Path]) -> dict:
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    tensors[k] = fh.get_tensor(k)
        except SafetensorError as e:
            raise QuantizeError(f"{str(f)!r}: corrupt or truncated *.safetensors file ({e})") from None
        except OSError as e:  # a shard the index names but that is missing or unreadable
            raise QuantizeError(f"cannot read {str(f)!r}: {e}") from None
    return tensors


def _write_atomically(out: Path, write) -> None:
    """Runs write(tmp) on a fresh directory and only then moves its files into OUT_DIR: a new OUT_DIR is a
    sibling renamed into place, an existing one gets the files os.replace'd into it (and loses the weight
    files of an earlier save, as save_pretrained's target does). On any failure the
    temporary directory and any parent directories made for it are removed: OUT_DIR stays as it was."""
    made = []
    existed = out.is_dir()
    try:
        if not existed:
            for parent in reversed(out.absolute().parents):
                if not parent.exists():
                    parent.mkdir()
                    made.append(parent)
        tmp = (out if existed else out.parent) / f".{out.name}.thrifty-tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        for d in reversed(made):
            d.rmdir()
        raise QuantizeError(f"cannot create OUT_DIR {str(out)!r}: {e}") from None
    try:
        write(tmp)
        if existed:
            written = {f.name for f in tmp.iterdir()}
            for name in sorted(written):
                os.replace(tmp / name, out / name)
            tmp.rmdir()
            # weight files of an earlier save (an index, shards) would shadow or outlive the new model.safetensors
            from thrifty.models.hf import remove_stale_weights
            remove_stale_weights(out, written)
        else:
            os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            raise QuantizeError(f"cannot write OUT_DIR {str(out)!r}: {e}") from None
        raise


def quantizable(name: str, t) -> bool:
    return (name.endswith("_proj.weight") and t.dim() == 2 and "lm_head" not in name and "embed" not in name)


def _calibration_ids(model_dir: Path, text: str):
    """Token ids of the calibration text: tokenizer.json through the `tokenizers` library (no transformers
    needed), else transformers' AutoTokenizer (tokenizer.model and the like) when it is installed.
    None when the directory has no tokenizer that can be loaded."""
    import torch
    if (model_dir / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            Tokenizer = None
        if Tokenizer is not None:
            return torch.tensor(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids, dtype=torch.long)
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.model").exists():
        try:
            import transformers
        except ImportError:
            transformers = None
        if transformers is not None:
            tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
            return tok(text, return_tensors="pt")["input_ids"][0]
    return None


def _random_ids(vocab_size: int, n: int):
    """n token ids drawn uniformly from the vocabulary with a fixed seed: the usual GPTQ fallback when no
    text can be encoded (the layer inputs still cover the model's embedding space, so the Hessians are
    well conditioned; text from the model's domain calibrates better)."""
    import torch
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.long)


def _calibration_model(model_dir: Path):
    """The float model whose layer inputs GPTQ calibrates on: thrifty.models.Llama (Llama, Mistral, Qwen2:
    no transformers import), else transformers' AutoModelForCausalLM when it is installed."""
    import torch

    from thrifty.models import ConfigError, Llama
    try:
        return Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    except ConfigError as err:
        try:
            import transformers
        except ImportError:
            raise QuantizeError(f"--method gptq runs the model for calibration activations; "
                                f"thrifty.models.Llama cannot run it ({err}) and transformers is not installed "
                                "(pip install transformers), or use --method rtn") from None
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
        except (ValueError, KeyError, OSError, ImportError) as terr:  # an architecture transformers does not know
            raise QuantizeError(f"--method gptq runs the model for calibration activations; neither "
                                f"thrifty.models.Llama ({err}) nor transformers ({type(terr).__name__}: "
                                f"{str(terr).splitlines()[0] if str(terr) else ''}) can run it; use --method rtn"
                                ) from None
        return model.eval()


def _calibration_hessians(model_dir: Path, names: list[str], args, text: str | None = None) -> dict:
    import torch

    from thrifty.quant.model import collect_hessians
    text = _calibration_text(args) if text is None else text
    ids = _calibration_ids(model_dir, text)
    if ids is None and args.calibration:  # the user's text cannot be used without a tokenizer: say so
        raise QuantizeError(f"--calibration {args.calibration} needs a tokenizer in {model_dir} "
                            "(tokenizer.json, or tokenizer files transformers can load) to encode the text; "
                            "leave --calibration out to calibrate on random token ids instead")
    if ids is not None and ids.numel() == 0:
        raise QuantizeError("the calibration text encodes to no tokens")
    model = _calibration_model(model_dir)
    vocab = getattr(model.config, "vocab_size", None)
    if ids is not None and vocab and int(ids.max()) >= vocab:
        raise QuantizeError(f"the tokenizer in {model_dir} does not match the model: it encodes the calibration "
                            f"text to ids up to {int(ids.max())}, the model's vocab_size is {vocab}")
    max_pos = getattr(model.config, "max_position_embeddings", None) or args.seq_len
    seq_len = max(1, min(args.seq_len, max_pos))
    n_tokens = max(seq_len, args.calibration_tokens // seq_len * seq_len)
    if ids is None:
        # no tokenizer and no text given (e.g. save_pretrained of a bare model): the embedded corpus
        # cannot be encoded, so calibrate on seeded random ids from the vocabulary, as GPTQ tools do
        if not vocab:
            raise QuantizeError(f"--method gptq found no tokenizer in {model_dir} and no "
                                "vocab_size in its config to draw random calibration tokens from")
        print(f"thrifty quantize: no usable tokenizer in {model_dir}: calibrating on {n_tokens} random token ids "
              f"(seed 0) from the model's vocabulary of {vocab}; add the tokenizer files for text calibration",
              file=sys.stderr, flush=True)
        ids = _random_ids(int(vocab), n_tokens)
    while ids.numel() < args.calibration_tokens:
        ids = torch.cat([ids, ids])
    ids = ids[:n_tokens]
    batches = [ids[i:i + seq_len][None] for i in range(0, ids.numel(), seq_len)]
    mods = [n[: -len(".weight")] for n in names]
    have = dict(model.named_modules())
    missing = [m for m in mods if m not in have]
    if missing:
        raise QuantizeError(f"layers {missing[:3]} of the checkpoint are not modules of the model; cannot calibrate")
    print(f"calibrating on {ids.numel()} tokens in {len(batches)} sequences ...", flush=True)
    return collect_hessians(model, mods, batches)


# kept for callers of the earlier name
_hessians_via_transformers = _calibration_hessians


def _ignored_flags(args) -> list[str]:
    """The flags given a value they do not act on (W8 has no groups; RTN reads no calibration data)."""
    out = []
    d = _DEFAULTS
    if args.bits == 8 and args.group_size != d["group_size"]:
        out.append(f"--group-size {args.group_size} with --bits 8 (per output channel)")
    if args.method == "rtn":
        given = [("--calibration", args.calibration is not None),
                 ("--calibration-tokens", args.calibration_tokens != d["calibration_tokens"]),
                 ("--seq-len", args.seq_len != d["seq_len"]), ("--damp", args.damp != d["damp"]),
                 ("--no-act-order", args.no_act_order)]
        out += [f"{name} with --method rtn (GPTQ only)" for name, set_ in given if set_]
    return out


def main(args) -> int:
    try:
        return _quantize(args)
    except QuantizeError as e:
        return _error(e)


def _quantize(args) -> int:
    from safetensors.torch import save_file

    from thrifty.quant import formats as F
    from thrifty.quant.gptq import gptq_quantize
    from thrifty.quant.model import FORMAT_NAME

    # every input is read and checked before the work, and nothing is written before the work is done
    src, out = Path(args.model_dir), Path(args.out_dir)
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src} has no config.json (expected a Hugging Face model directory)")
    config = _read_config(src)
    _check_not_quantized(src, config)
    files = _weight_files(src)
    if args.act_bits == 8 and args.bits != 8:
        raise QuantizeError("--act-bits 8 needs --bits 8 (W8A8)")
    if args.method == "gptq" and (args.calibration_tokens < 1 or args.seq_len < 1):
        raise QuantizeError(f"--calibration-tokens and --seq-len must be positive, got {args.calibration_tokens} "
                            f"and {args.seq_len}")
    if not args.damp >= 0:  # NaN too
        raise QuantizeError(f"--damp must be >= 0, got {args.damp}")
    if args.bits == 4 and (args.group_size <= 0 or args.group_size % 32):
        raise QuantizeError(f"--group-size must be a positive multiple of 32, got {args.group_size}")
    _check_out_dir(src, out)
    for flag in _ignored_flags(args):
        print(f"thrifty quantize: note: {flag} has no effect here", file=sys.stderr, flush=True)
    # read now: a missing or empty --calibration file fails before the weights are loaded
    cal_text = _calibration_text(args) if args.method == "gptq" else None
    tensors = _load_tensors(files)
    names = [k for k, t in tensors.items() if quantizable(k, t)]
    if not names:
        raise QuantizeError(f"no *_proj.weight matrices found in {src}")
    for n in names:
        if args.bits == 4 and tensors[n].shape[1] % args.group_size:
            raise QuantizeError(f"{n}: in_features K={tensors[n].shape[1]} is not a multiple of "
                                f"group_size={args.group_size}")
    hessians = _calibration_hessians(src, names, args, cal_text) if args.method == "gptq" else {}
    outt, layers = {}, {}
    for k, t in tensors.items():
        if k not in names:
            outt[k] = t.contiguous()
            continue
        base = k[: -len(".weight")]
        w = t.float()
        perm = None
        if args.method == "gptq":
            q, s, z, perm = gptq_quantize(w, hessians.pop(base), bits=args.bits, group_size=args.group_size,
                                          damp=args.damp, act_order=not args.no_act_order)
        elif args.bits == 8:
            q, s = F.quantize_rtn_w8(w)
            z = None
        else:
            q, s, z = F.quantize_rtn_w4(w, args.group_size)
        outt[base + ".qweight"] = q.contiguous() if args.bits == 8 else F.pack_int4(q)
        outt[base + ".scales"] = s.contiguous()
        if z is not None:
            outt[base + ".zeros"] = z.contiguous()
        if perm is not None:
            outt[base + ".perm"] = perm.contiguous()
        bias = tensors.get(base + ".bias")
        layers[base] = {"in_features": w.shape[1], "out_features": w.shape[0], "bias": bias is not None,
                        "bits": args.bits, "group_size": args.group_size if args.bits == 4 else -1,
                        "act_bits": args.act_bits, "act_order": perm is not None, "smooth": False}
        err = (F.dequantize_reference(F.unpack_int4(outt[base + ".qweight"]) if args.bits == 4 else q, s, z,
                                      args.group_size) - (w if perm is None else w[:, perm])).norm() / w.norm()
        print(f"  {base}: {tuple(w.shape)} -> int{args.bits}  weight rel. error {err:.4f}", flush=True)
    cfg = {"bits": args.bits, "group_size": args.group_size if args.bits == 4 else -1,  # W8: per output channel
           "method": args.method, "act_bits": args.act_bits}
    config["quantization_config"] = {"quant_method": "thrifty", "format_version": F.FORMAT_VERSION, **cfg}

    def write(d: Path) -> None:
        save_file(outt, str(d / "model.safetensors"),
                  metadata={"format": FORMAT_NAME, "format_version": str(F.FORMAT_VERSION),
                            "layers": json.dumps(layers), "config": json.dumps(cfg)})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copy(src / f, d / f)

    _write_atomically(out, write)
    before = sum(t.numel() * t.element_size() for t in tensors.values())
    after = sum(t.numel() * t.element_size() for t in outt.values())
    print(f"wrote {out / 'model.safetensors'}: {len(layers)} layers quantized, {before / 2**20:.1f} MiB -> "
          f"{after / 2**20:.1f} MiB")
    _note_unloadable({k: v for k, v in config.items() if k != "quantization_config"})  # MODEL_DIR's own
    return 0
