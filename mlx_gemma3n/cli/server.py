"""The server command: load the model once, then answer OpenAI API requests over HTTP.

    python -m mlx_gemma3n.server --model google/gemma-3n-E2B-it [--host 127.0.0.1] [--port 8080] [--api-key KEY]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .common import add_model_args, load_from_args
from .common import parser as cli_parser


def build_parser():
    parser = cli_parser("python -m mlx_gemma3n.server", "Serve Gemma 3n through the OpenAI HTTP API.")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: this machine only, unless 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (0 picks a free one)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="the most tokens one reply may have, and the length of a reply that names none")
    parser.add_argument("--max-body-mb", type=float, default=50.0, help="the largest request body accepted, in MB")
    parser.add_argument("--allow-http-media", action="store_true", help="fetch http(s) image URLs given in messages")
    parser.add_argument("--allow-local-files", action="store_true",
                        help="read image paths and file:// URLs given in messages from this machine's disk")
    parser.add_argument("--prompt-cache-entries", type=int, default=8,
                        help="conversations whose KV cache is kept between requests (0 turns it off)")
    parser.add_argument("--prompt-cache-mb", type=float, default=512.0, help="the most memory those caches may take, in MB")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return parser


def served_id(model: str) -> str:
    """The id clients see: a local checkpoint's directory name, or the repo id as given."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def sizes(config) -> tuple[str, ...]:
    """The MatFormer presets this model can run (all of them for an E4B, none for an E2B)."""
    from ..errors import InputError
    from ..submodel import PRESETS, plan_for

    runnable = []
    for preset in PRESETS:
        try:
            plan_for(config, preset.name)
        except InputError:
            continue
        runnable.append(preset.name)
    return tuple(runnable)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    import uvicorn

    from ..errors import Gemma3nError
    from ..server import ServerSettings, create_app
    from ..server.media import MediaPolicy

    from ..submodel import Submodel

    try:
        if args.submodel:
            args.submodel = Submodel.preset(args.submodel).name  # as the model ids name it
        model, tokenizer = load_from_args(args)
    except (Gemma3nError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    settings = ServerSettings(
        model_id=served_id(args.model), api_key=args.api_key, max_tokens=args.max_tokens,
        max_body_bytes=int(args.max_body_mb * 1e6),
        media=MediaPolicy(allow_http=args.allow_http_media, allow_files=args.allow_local_files),
        prompt_cache_entries=args.prompt_cache_entries, prompt_cache_bytes=int(args.prompt_cache_mb * 1e6),
        submodel=args.submodel, sizes=sizes(model.config),
    )
    app = create_app(model, tokenizer, settings)
    # Our access log is one line per request once it is done (with its token counts); uvicorn's would be a second.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
