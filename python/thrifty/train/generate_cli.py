"""`thrifty generate RUN_DIR --prompt "..."`: sample from a trained run or any Hugging Face
Llama-family directory (config.json + *.safetensors + tokenizer.json)."""
from __future__ import annotations

import re
import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="RUN_DIR", help="a run directory of `thrifty train` or a Hugging Face model directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several; default: an empty prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")


def resolve_model_dir(path) -> Path:
    """RUN_DIR itself when it holds an exported model, else its latest checkpoint."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    ck = p / "checkpoints"
    if ck.is_dir():
        steps = sorted(d for d in ck.iterdir() if re.fullmatch(r"step_\d+", d.name) and (d / "config.json").is_file())
        if steps:
            return steps[-1]
    raise FileNotFoundError(f"{str(p)!r} holds no model (no config.json, no checkpoints/step_*)")


def load(path, device=None, dtype=None):
    """(model, tokenizer) from a run or Hugging Face directory."""
    import torch

    from thrifty.data import load_tokenizer
    from thrifty.train._compat import model_api

    d = resolve_model_dir(path)
    Llama, _, _ = model_api()
    model = Llama.from_pretrained(str(d), dtype=dtype)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    tok_dir = d if (d / "tokenizer.json").is_file() else Path(path)
    return model, load_tokenizer(tok_dir)


def _prompt_ids(tok, prompt: str, eos) -> list[int]:
    return tok.encode(prompt).ids or ([eos] if eos is not None else [0])


def _bad_args(args) -> str | None:
    """The message for a sampling option out of range, before any model is loaded."""
    if args.max_new_tokens < 0:
        return f"--max-new-tokens: expected a number >= 0, got {args.max_new_tokens}"
    if not args.temperature >= 0:  # NaN too
        return f"--temperature: expected a number >= 0 (0: greedy), got {args.temperature}"
    if args.top_k < 0:
        return f"--top-k: expected a number >= 0 (0: off), got {args.top_k}"
    if not 0 < args.top_p <= 1:
        return f"--top-p: expected a number in (0, 1], got {args.top_p}"
    return None


def generate_text(model, tok, prompts, max_new_tokens=64, temperature=0.8, top_k=50, top_p=0.95, seed=0) -> list[str]:
    import torch

    from thrifty.data import eos_id

    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    outs = []
    eos = eos_id(tok)
    for prompt in prompts:
        ids = _prompt_ids(tok, prompt, eos)
        x = torch.tensor([ids], device=dev)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos is not None:
            kw["eos_token_id"] = eos
        y = model.generate(x, **kw)
        new = [t for t in y[0, len(ids):].tolist() if t != eos]
        outs.append(prompt + tok.decode(new))
    return outs


def _error(msg) -> int:
    print(f"thrifty generate: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    from safetensors import SafetensorError

    from thrifty.data import eos_id

    bad = _bad_args(args)
    if bad:
        return _error(bad)
    if args.device:
        from thrifty.train.trainer import TrainError, parse_device
        try:
            parse_device(args.device, "--device")
        except TrainError as e:
            return _error(e)
    try:
        model, tok = load(args.model_dir, args.device)
    except SafetensorError as e:
        return _error(f"{args.model_dir}: corrupt or truncated *.safetensors file ({e})")
    except (OSError, ValueError) as e:
        return _error(e)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        return _error(f"tokenizer/model vocab mismatch: the tokenizer has {vocab} tokens, the model "
                      f"{model.config.vocab_size}")
    prompts = args.prompt or [""]
    limit = model.config.max_position_embeddings
    longest = max(len(_prompt_ids(tok, p, eos_id(tok))) for p in prompts)
    if longest + args.max_new_tokens > limit:
        return _error(f"--max-new-tokens {args.max_new_tokens}: the prompt ({longest} tokens) plus the new tokens "
                      f"exceed the model's max length (max_position_embeddings {limit}); at most "
                      f"{max(0, limit - longest)} new tokens fit")
    try:
        texts = generate_text(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.seed)
    except ValueError as e:  # what generate() itself refuses
        return _error(e)
    for text in texts:
        print(text)
        print("-" * 40)
    return 0
