"""`workbench generate`, `workbench chat`, `workbench tokenize`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.errors import UserError

DEFAULTS_HELP = (
    "the embedded default, SmolLM2-135M-Instruct Q4_1, pulled into the cache on first use"
)


def add_model_args(p: argparse.ArgumentParser, *, backend: bool = True) -> None:
    p.add_argument(
        "--model", "-m", help=f"GGUF file or known model name (default: {DEFAULTS_HELP})"
    )
    if backend:
        p.add_argument(
            "--backend",
            default="auto",
            choices=("auto", "numpy", "emulator", "cupy"),
            help="auto (the GPU through CuPy if usable, else numpy), numpy (CPU), emulator (the "
            "HIP kernels on the CPU emulator: slow, for checking kernels), cupy (default: auto)",
        )
        p.add_argument(
            "--threads",
            "-t",
            type=int,
            help="CPU threads (default: the number of physical cores)",
        )
        p.add_argument(
            "--profile",
            action="store_true",
            help="record every kernel launch and print a per-kernel table at the end (the numpy "
            "backend's fused decode is recorded per layer, as decode_layer and decode_head)",
        )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default 1.0)")
    g.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )


def generation_config(args: argparse.Namespace, logprobs: int = 0) -> Any:
    from workbench.engine.generate import GenerationConfig

    return GenerationConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        logprobs=logprobs,
    )


def make_engine(args: argparse.Namespace) -> Any:
    from workbench.cli.progress import pull_progress
    from workbench.engine.generate import Engine
    from workbench.engine.loader import load

    with pull_progress() as progress:
        model = load(args.model, progress=progress)
    engine = Engine(
        model, backend=args.backend, threads=args.threads, compile_progress=compile_progress
    )
    warm_up(engine)
    engine.profiler.enabled = getattr(args, "profile", False)
    return engine


def compile_progress(done: int, total: int, source: str) -> None:
    """A device backend building its kernel modules: one status line on stderr."""
    end = "\n" if done == total else ""
    line = f"\rbuilding kernel modules {done}/{total} {source:<16}"
    print(line, end=end, file=sys.stderr, flush=True)


def warm_up(engine: Any) -> None:
    """Compile (first run) or load the kernels before anything is timed, saying so on stderr
    when it has to compile."""

    def on_compile() -> None:
        print("compiling CPU kernels (first run only)...", file=sys.stderr, flush=True)

    engine.warm_up(on_compile)


def print_profile(engine: Any) -> None:
    """The per-kernel summary of the launches recorded so far, on stderr."""
    rows = engine.profiler.summary()
    if not rows:
        return
    print(
        f"{'kernel':24s} {'count':>7s} {'total ms':>9s} {'p50 us':>8s} {'GB/s':>7s}",
        file=sys.stderr,
    )
    for r in rows:
        gb_s = f"{r['gb_s']:.1f}" if r.get("gb_s") else "-"
        print(
            f"{r['name']:24s} {r['count']:7d} {r['total_s'] * 1e3:9.2f} "
            f"{r['p50_s'] * 1e6:8.1f} {gb_s:>7s}",
            file=sys.stderr,
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text from a prompt, printing tokens as they arrive and then a "
        "summary line (prompt tokens, generated tokens, time to first token, decode tok/s). "
        "The prompt is formatted with the model's chat template unless --raw.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--system", help="system message (chat-formatted prompts only)")
    p.add_argument("--logprobs", type=int, default=0, metavar="N", help="top-N logprobs (--json)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "chat",
        help="interactive chat with history",
        description="Chat with the model in the terminal. Commands: /reset clears the history, "
        "/quit (or Ctrl-D) leaves.",
    )
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "tokenize",
        help="show token ids and pieces for text",
        description="Tokenize each TEXT with the model's vocabulary and print ids and pieces. "
        "By default special tokens are not parsed and BOS/EOS are not added, as llama.cpp's "
        "tokenizer tests expect. Works on vocab-only GGUF files.",
    )
    p.add_argument("text", nargs="*", help="texts to tokenize (default: read stdin as one text)")
    add_model_args(p, backend=False)
    p.add_argument("--special", action="store_true", help="parse special tokens like <|im_end|>")
    p.add_argument("--bos", action="store_true", help="add BOS/EOS as the model's flags say")
    p.add_argument("--json", action="store_true", help='print [{"ids": [...], "pieces": [...]}]')
    p.set_defaults(func=cmd_tokenize)


def _read_prompt(prompt: str | None) -> str:
    if prompt is None:
        if sys.stdin.isatty():
            raise UserError("user.empty_prompt", "give a prompt as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("user.empty_prompt", "the prompt is empty")
    return prompt


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args.prompt)
    config = generation_config(args, logprobs=args.logprobs)  # validate before loading a model
    engine = make_engine(args)
    if args.raw:
        gen = engine.generate(prompt, config)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        gen = engine.chat([*messages, {"role": "user", "content": prompt}], config)
    out = sys.stdout
    for event in gen:
        if not args.json:
            out.write(event.text)
            out.flush()
    result = gen.result
    assert result is not None
    if args.json:
        obj: dict[str, Any] = {
            "text": result.text,
            "token_ids": result.token_ids,
            "prompt_tokens": len(result.prompt_token_ids),
            "generated_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason,
            "timings": result.timings.to_dict(),
            "model": engine.model.name,
            "backend": engine.backend.name,
        }
        if args.logprobs:
            obj["logprobs"] = [
                {
                    "id": tid,
                    "logprob": lp,
                    "top": [{"id": t.id, "piece": t.piece, "logprob": t.logprob} for t in top],
                }
                for tid, (lp, top) in zip(result.token_ids, result.logprobs)
            ]
        json.dump(obj, out, ensure_ascii=False)
        out.write("\n")
    else:
        out.write("\n")
        print(summary_line(result), file=sys.stderr)
    if args.profile:
        print_profile(engine)
    return 0


def summary_line(result: Any) -> str:
    t = result.timings
    return (
        f"[{t.prompt_tokens} prompt tokens, {t.generated_tokens} generated "
        f"({result.finish_reason}), prefill {t.prefill_tok_s:.1f} tok/s, "
        f"time to first token {t.ttft_s * 1000:.0f} ms, decode {t.decode_tok_s:.1f} tok/s]"
    )


def cmd_chat(args: argparse.Namespace) -> int:
    config = generation_config(args)
    engine = make_engine(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print(f"Chatting with {engine.model.name}. /reset clears the history, /quit leaves.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            gen = engine.chat(system + history, config)
            for event in gen:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except UserError as e:
            history.pop()
            print(f"error [{e.code}]: {e.message}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            gen.cancel()
            print(" (interrupted)")
        assert gen.result is not None
        history.append({"role": "assistant", "content": gen.result.text})
        print()
        print(summary_line(gen.result), file=sys.stderr)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from workbench import store
    from workbench.cli.progress import pull_progress
    from workbench.gguf.reader import read_gguf
    from workbench.gguf.tokenizer import Tokenizer

    texts = args.text or [sys.stdin.read()]
    with pull_progress() as progress:
        path = store.resolve(args.model, store.default_home(), progress=progress)
    tok = Tokenizer.from_metadata(read_gguf(path, vocab_only=True).metadata)
    rows = []
    for text in texts:
        ids = tok.encode(text, add_special=args.bos, parse_special=args.special)
        rows.append({"ids": ids, "pieces": [tok.piece(i) for i in ids]})
    if args.json:
        json.dump(rows, sys.stdout, ensure_ascii=False)
        print()
    else:
        for row in rows:
            print(" ".join(f"{i}:{p!r}" for i, p in zip(row["ids"], row["pieces"])))
    return 0
