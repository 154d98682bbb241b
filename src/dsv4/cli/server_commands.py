"""``dsv4 serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    parser.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' (default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--served-model-name", help="model name clients send (default: from the checkpoint)")
    parser.add_argument("--max-running", type=int, default=16, help="sequences decoded together (default 16)")
    parser.add_argument("--max-queued", type=int, default=64,
                        help="requests waiting beyond --max-running before new ones get HTTP 429 (default 64)")
    parser.add_argument("--max-model-len", type=int, help="context limit in tokens (default: the model's)")
    parser.add_argument("--default-max-tokens", type=int, default=1024,
                        help="completion limit for requests that set none (default 1024)")
    parser.add_argument("--legacy-aliases", action="store_true",
                        help="map the retired names deepseek-chat / deepseek-reasoner instead of rejecting them")
    parser.add_argument("--family", default="v4", choices=["v4", "v4-0731"],
                        help="model family for reasoning_effort tiers (default v4)")
    parser.add_argument("--numerics", default="reference", choices=["reference", "plain"])
    parser.add_argument("--kv-storage", default="float", choices=["float", "deployment"],
                        help="KV cache storage: activation dtype, or FP8 KV + FP4 index keys")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds in-flight requests may take to finish on shutdown before they are "
                             "cancelled (default 10)")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dsv4.server.app import ServerSettings, create_app

    for name in ("max_running", "max_queued", "default_max_tokens"):
        if getattr(args, name) < (0 if name == "max_queued" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    settings = ServerSettings(model=args.model, served_model_name=args.served_model_name,
                              max_running=args.max_running, max_queued=args.max_queued,
                              max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens,
                              legacy_aliases=args.legacy_aliases, family=args.family,
                              numerics=args.numerics, storage=args.kv_storage)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
