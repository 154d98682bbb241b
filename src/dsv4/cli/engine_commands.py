"""Command-line subcommands of the engine area: ``dsv4 generate``, ``dsv4 chat``, ``dsv4 kv``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``chat`` and ``kv``."""
    generate = subparsers.add_parser(
        "generate", help="generate a completion of a raw text prompt",
        description="Tokenize a raw text prompt, run it through the engine and print the completion.")
    _add_model_arguments(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", type=Path, metavar="FILE", help="file with the prompt text")
    _add_sampling_arguments(generate)
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object (text, token ids, counts, timings)")
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat", help="chat interactively with a model",
        description="Chat with a model in the terminal, using the DeepSeek-V4 chat format. "
                    "Type /exit or press Ctrl-D to leave.")
    _add_model_arguments(chat)
    _add_sampling_arguments(chat, default_max_tokens=256)
    chat.add_argument("--mode", choices=("chat", "thinking"), default="chat",
                      help="chat (no reasoning) or thinking; default: chat")
    chat.set_defaults(handler=run_chat)

    kv = subparsers.add_parser(
        "kv", help="print the KV cache bytes of a config at a context length",
        description="KV cache bytes per layer kind at a context length, in bf16 and the deployment "
                    "format, with ratios to a bf16 GQA-8 cache and DeepSeek-V3.2's cache.")
    kv.add_argument("--config", required=True, metavar="NAME|PATH",
                    help="preset (flash, pro, tiny, ...) or a config.json / checkpoint directory")
    kv.add_argument("--context", required=True, type=int, metavar="TOKENS", help="context length in tokens")
    kv.add_argument("--json", action="store_true", help="print JSON instead of a table")
    kv.set_defaults(handler=run_kv)



def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", metavar="PATH|tiny",
                        help="checkpoint directory in the released layout, or 'tiny' (random "
                             "weights, created on first use); default: tiny")
    parser.add_argument("--numerics", choices=("reference", "plain"), default="plain",
                        help="reference simulates the FP8/FP4 activation rounding; default: plain")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")


def _add_sampling_arguments(parser: argparse.ArgumentParser, default_max_tokens: int = 64) -> None:
    parser.add_argument("--max-tokens", type=int, default=default_max_tokens,
                        help=f"maximum new tokens; default: {default_max_tokens}")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; default: 0")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; default: 1")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed; default: random")


def _load(args):
    import torch

    from dsv4.model.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(args.model, numerics=args.numerics, progress=sys.stderr.isatty())
    logger.info("model loaded in %.1f s", time.perf_counter() - started)
    return model


def _tokenizer():
    from dsv4.chat import default_tokenizer

    return default_tokenizer()


def _params(args):
    from dsv4.engine.sampler import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed)


def _run_one(engine, prompt_ids: list[int], params, on_text=None, detokenizer=None):
    """Run one request to completion with a prefill progress bar; return (output, timings)."""
    from tqdm import tqdm

    request_id = engine.add_request(None, prompt_ids, params)
    sequence = engine._sequences[request_id]
    chunk = engine.config.scheduler.prefill_chunk
    bar = tqdm(total=len(prompt_ids), desc="prefill", unit="tok", leave=False,
               disable=len(prompt_ids) <= chunk or not sys.stderr.isatty())
    started = time.perf_counter()
    first_token_at = None
    final = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if first_token_at is None and output.new_token_ids:
                first_token_at = time.perf_counter()
                bar.close()
            if on_text is not None and detokenizer is not None:
                on_text(detokenizer.feed(output.new_token_ids))
            if output.finished:
                final = output
        if first_token_at is None:
            bar.update(sequence.num_computed - bar.n)
    bar.close()
    ended = time.perf_counter()
    first_token_at = first_token_at or ended
    prefill_s = first_token_at - started
    decode_tokens = max(0, final.completion_tokens - 1)
    timings = {"prefill_s": prefill_s, "prefill_tok_s": len(prompt_ids) / prefill_s if prefill_s else 0.0,
               "decode_s": ended - first_token_at,
               "decode_tok_s": decode_tokens / (ended - first_token_at) if ended > first_token_at else 0.0}
    return final, timings


def run_generate(args) -> int:
    from dsv4.engine.engine import SMALL_MODEL_CACHE_BYTES, EngineConfig, LLMEngine

    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    tokenizer = _tokenizer()
    model = _load(args)
    config = EngineConfig(upcast_weights=True, dequantized_cache_bytes=SMALL_MODEL_CACHE_BYTES)
    engine = LLMEngine(model, config,
                       detokenize=tokenizer.decode)
    prompt_ids = tokenizer.encode(text)
    output, timings = _run_one(engine, prompt_ids, _params(args))
    completion = tokenizer.decode(output.token_ids)
    if args.json:
        print(json.dumps({"text": completion, "token_ids": output.token_ids,
                          "finish_reason": output.finish_reason, "prompt_tokens": output.prompt_tokens,
                          "completion_tokens": output.completion_tokens, **timings}))
    else:
        print(completion)
        logger.info("%d prompt tokens at %.1f tok/s, %d new tokens at %.1f tok/s (%s)",
                    output.prompt_tokens, timings["prefill_tok_s"], output.completion_tokens,
                    timings["decode_tok_s"], output.finish_reason)
    return 0


def _encode_chat(messages: list[dict], mode: str, tokenizer) -> list[int]:
    try:
        from dsv4.chat import encode_messages
    except ImportError:  # the chat format is a separate area; raw text still works without it
        logger.warning("dsv4.chat.encode_messages is not available; sending the raw text of the last message")
        return tokenizer.encode(messages[-1]["content"])
    return encode_messages(messages, mode=mode, tokenizer=tokenizer).token_ids


def run_chat(args) -> int:
    from dsv4.engine.engine import SMALL_MODEL_CACHE_BYTES, EngineConfig, LLMEngine

    tokenizer = _tokenizer()
    model = _load(args)
    config = EngineConfig(upcast_weights=True, dequantized_cache_bytes=SMALL_MODEL_CACHE_BYTES)
    engine = LLMEngine(model, config,
                       detokenize=tokenizer.decode)
    if args.model == "tiny":
        print("(tiny has random weights: its replies are noise that shows the machinery works)", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = _encode_chat(messages, args.mode, tokenizer)
        print("model> ", end="", flush=True)
        detokenizer = tokenizer.detokenizer()
        output, timings = _run_one(engine, prompt_ids, _params(args),
                                   on_text=lambda text: print(text, end="", flush=True),
                                   detokenizer=detokenizer)
        print(detokenizer.flush())
        logger.info("%d prompt tokens, %d new tokens at %.1f tok/s (%s)", output.prompt_tokens,
                    output.completion_tokens, timings["decode_tok_s"], output.finish_reason)
        reply = tokenizer.decode(output.token_ids)
        messages.append({"role": "assistant", "content": reply})


def run_kv(args) -> int:
    from dsv4.config import resolve_config
    from dsv4.engine.kv_report import format_report, kv_report

    if args.context < 0:
        raise ValueError(f"--context must be >= 0 tokens, got {args.context}")
    config = resolve_config(args.config)
    report = kv_report(config, args.context, str(args.config))
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
