"""`thrifty generate RUN_DIR --prompt "..."`: sample from a trained run or any Hugging Face
Llama-family directory (config.json + *.safetensors + tokenizer.json)."""
from __future__ import annotations

import sys
from pathlib import Path

from thrifty.train.run_dir import step_dirs, step_of


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="RUN_DIR", help="a run directory of `thrifty train` or a Hugging Face model directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several; default: an empty prompt)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens per prompt (default 64, or as many as the model's context leaves)")
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
        steps = step_dirs(ck, holding="config.json")
        if steps:
            return steps[-1]
    raise FileNotFoundError(f"{str(p)!r} holds no model (no config.json, no checkpoints/step_*)")


def _note_newer_checkpoints(run_dir: Path) -> None:
    """A finished run resumed with more steps and stopped before its end keeps the earlier export: say that
    its checkpoints are newer (the export is what generate reads)."""
    import json
    try:
        exported = json.loads((run_dir / "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return
    steps = step_dirs(run_dir / "checkpoints", holding="config.json")
    if isinstance(exported, int) and steps and step_of(steps[-1]) > exported:
        print(f"note: {run_dir}'s exported model is from step {exported}, its newest checkpoint from step "
              f"{step_of(steps[-1])} (a resumed run that has not finished): generating from the export; pass "
              f"{steps[-1]} for the newer weights, or finish the run with --resume", file=sys.stderr)


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


def _prompt_ids(tok, prompt: str, start) -> list[int]:
    """The prompt's ids; an empty prompt starts from ``start`` (the model's bos, else its eos, else 0)."""
    return tok.encode(prompt).ids or ([start] if start is not None else [0])


def _start_id(model, eos: list[int]):
    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < model.config.vocab_size:
        return bos
    return eos[0] if eos else None


def eos_ids(model, tok, model_dir=None) -> list[int]:
    """The ids that end a sample, as transformers' generate reads them: generation_config.json's eos_token_id
    in ``model_dir`` when it has one, else config.json's (Llama 3 Instruct lists <|eot_id|> there next to
    <|end_of_text|>); then the tokenizer's own end-of-text token if not among them."""
    import json

    from thrifty.data import eos_id

    ids = None
    if model_dir is not None:
        gc = Path(model_dir) / "generation_config.json"
        try:
            raw = json.loads(gc.read_text()).get("eos_token_id") if gc.is_file() else None
        except (OSError, ValueError, AttributeError):
            raw = None
        if raw is not None:
            ids = [raw] if isinstance(raw, int) else list(raw) if isinstance(raw, list) else None
    if ids is None:
        ids = list(model.config.eos_ids)
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    t = eos_id(tok)
    if t is not None and t not in ids:
        ids.append(t)
    return ids


def _bad_args(args) -> str | None:
    """The message for a sampling option out of range, before any model is loaded."""
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        return f"--max-new-tokens: expected a number >= 0, got {args.max_new_tokens}"
    if not 0 <= args.temperature < float("inf"):  # NaN too
        return f"--temperature: expected a finite number >= 0 (0: greedy), got {args.temperature}"
    if args.top_k < 0:
        return f"--top-k: expected a number >= 0 (0: off), got {args.top_k}"
    if not 0 < args.top_p <= 1:
        return f"--top-p: expected a number in (0, 1], got {args.top_p}"
    if not 0 <= args.seed < 2**32:  # as thrifty train's --seed (torch.manual_seed overflowed past 2**63)
        return f"--seed: expected an integer in [0, 2**32), got {args.seed}"
    return None


def generate_text(model, tok, prompts, max_new_tokens=64, temperature=0.8, top_k=50, top_p=0.95, seed=0,
                  eos_token_id=None) -> list[str]:
    """Each prompt followed by its sample. ``eos_token_id`` (an id or a list): the ids that end a sample
    (default: the model config's and the tokenizer's, see :func:`eos_ids`); the text stops before the first."""
    import torch

    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    outs = []
    if eos_token_id is None:
        eos = eos_ids(model, tok)
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    start = _start_id(model, eos)
    for prompt in prompts:
        ids = _prompt_ids(tok, prompt, start)
        x = torch.tensor([ids], device=dev)
        y = model.generate(x, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=eos)
        new = y[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos), len(new))
        # decoded with the prompt, then the prompt's own decoding cut off: SentencePiece-style decoders (Llama 2,
        # Mistral) drop a leading space of the first token decoded alone ("is" + "Paris" for "is Paris")
        head, full = tok.decode(ids), tok.decode(ids + new[:stop])
        outs.append(prompt + (full[len(head):] if full.startswith(head) else tok.decode(new[:stop])))
    return outs


def _error(msg) -> int:
    print(f"thrifty generate: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    from safetensors import SafetensorError

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
    model_dir = resolve_model_dir(args.model_dir)
    _note_newer_checkpoints(model_dir)
    eos = eos_ids(model, tok, model_dir)
    limit = model.config.max_position_embeddings
    longest = max(len(_prompt_ids(tok, p, _start_id(model, eos))) for p in prompts)
    fit = model.new_tokens_fit(longest)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(64, fit)
    if args.max_new_tokens > fit:
        return _error(f"--max-new-tokens {args.max_new_tokens}: the prompt ({longest} tokens) plus the new tokens "
                      f"exceed the model's max length (max_position_embeddings {limit}); at most "
                      f"{fit} new tokens fit")
    try:
        texts = generate_text(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.seed, eos_token_id=eos)
    except ValueError as e:  # what generate() itself refuses
        return _error(e)
    for text in texts:
        print(text)
        print("-" * 40)
    return 0
