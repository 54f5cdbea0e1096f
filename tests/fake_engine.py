"""A stand-in for the GPU engines: a real process serving the OpenAI API.

    python tests/fake_engine.py sglang   --model-path M --host H --port P ...
    python tests/fake_engine.py vllm     M --host H --port P ...   (or --uds PATH)
    python tests/fake_engine.py llamacpp --model M --host H --port P ...

Each dialect parses the real launcher's flag spellings strictly: a flag the
real engine would not accept makes it exit 2, so the daemon's real launch
code is what gets tested. Knobs come from the environment (a model's `env`
in models.yaml):

    FAKE_START_DELAY       seconds before the port opens
    FAKE_WARMUP            seconds after the port opens during which /health answers 503
    FAKE_EXIT_DURING_START exit with this code before opening the port
    FAKE_TOKEN_DELAY       seconds between streamed tokens (default 0)
    FAKE_TOKENS            tokens when the request has no max_tokens (default 16)
    FAKE_TOKEN_BYTES       pad each token's text to this many bytes (default: no padding)
    FAKE_CRASH_AFTER       exit hard after streaming this many tokens
    FAKE_CRASH_ON          exit hard on receiving a request whose body contains this text
    FAKE_IGNORE_SIGTERM    1: ignore SIGTERM (only SIGKILL ends it)
    FAKE_HANG              "start": never become ready; "request": never answer requests
    FAKE_CHILDREN          spawn this many child processes (they ignore SIGTERM too if asked)
    FAKE_LOG_REQUESTS      1: print each /v1 request with its X-Request-ID
    FAKE_GPU_LEDGER        a file shared by the fake engines: GPU memory shares (tests/fake_gpu.py)
    FAKE_WAKE_DELAY        seconds a wake from sleep takes (tests/fake_gpu.py)
    FAKE_SLEEP_DELAY       seconds a sleep takes (tests/fake_gpu.py)
    FAKE_FIRST_REQUEST_DELAY  seconds the engine's first completion waits before answering (what
                           a real engine's first request pays: CUDA graph capture, lazy compiles)
    FAKE_PREFILL_DELAY     seconds to "prefill" a prompt whose prefix the engine has not seen;
                           one it has seen (a later turn of the same conversation) starts at once,
                           as with a KV prefix cache (SGLang's radix cache, vLLM's prefix caching)

`GET /fake/stats` reports requests seen, in flight, the most ever in flight,
streams cancelled by the client, tokens sent, the connections requests came
on, and the headers of the last request.

What a request may contain, how many tokens it gets and how it is refused
follow each real engine's dialect: see tests/fake_protocol.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_protocol as proto  # run as a script: its own folder is not a package root
from fake_gpu import FakeGpu


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The real engines' flags, one sub-parser per dialect (held to the real parsers by
    tests/contract/)."""
    p = argparse.ArgumentParser(prog="fake_engine")
    dialects = p.add_subparsers(dest="dialect", required=True)

    sg = dialects.add_parser("sglang")
    sg.add_argument("--model-path", required=True)
    sg.add_argument("--host", default="127.0.0.1")
    sg.add_argument("--port", type=int, default=30000)
    sg.add_argument("--served-model-name")
    sg.add_argument("--max-running-requests", type=int)
    sg.add_argument("--max-total-tokens", type=int)
    sg.add_argument("--mem-fraction-static", type=float)
    sg.add_argument("--tp-size", type=int)
    sg.add_argument("--quantization", choices=["awq", "gptq", "fp8"])
    sg.add_argument("--is-embedding", action="store_true")
    sg.add_argument("--api-key")
    sg.add_argument("--context-length", type=int)
    sg.add_argument("--enable-metrics", action="store_true")
    sg.add_argument("--enable-memory-saver", action="store_true")

    vl = dialects.add_parser("vllm")
    vl.add_argument("model")
    vl.add_argument("--host")
    vl.add_argument("--port", type=int, default=8000)
    vl.add_argument("--uds")
    vl.add_argument("--served-model-name", nargs="+")
    vl.add_argument("-q", "--quantization", choices=["awq", "gptq", "fp8"])
    vl.add_argument("--runner", choices=["auto", "generate", "pooling"])
    vl.add_argument("--convert", choices=["auto", "none", "embed", "classify"])
    vl.add_argument("-tp", "--tensor-parallel-size", type=int)
    vl.add_argument("--api-key")
    vl.add_argument("--max-num-seqs", type=int)
    vl.add_argument("--gpu-memory-utilization", type=float)
    vl.add_argument("--max-model-len", type=int)
    vl.add_argument("--enable-sleep-mode", action="store_true")

    lc = dialects.add_parser("llamacpp")
    lc.add_argument("--model", required=True)
    lc.add_argument("--model_alias")
    lc.add_argument("--host", default="localhost")
    lc.add_argument("--port", type=int, default=8000)
    lc.add_argument("--interrupt_requests", type=_bool, default=True)
    lc.add_argument("--embedding", type=_bool, default=False)
    lc.add_argument("--api_key")
    lc.add_argument("--n_ctx", type=int)
    lc.add_argument("--n_threads", type=int)
    lc.add_argument("--chat_format")
    return p


class Knobs:
    def __init__(self, env: dict[str, str]) -> None:
        self.start_delay = float(env.get("FAKE_START_DELAY", "0"))
        self.warmup = float(env.get("FAKE_WARMUP", "0"))
        self.exit_during_start = env.get("FAKE_EXIT_DURING_START")
        self.token_delay = float(env.get("FAKE_TOKEN_DELAY", "0"))
        self.tokens = int(env.get("FAKE_TOKENS", "16"))
        self.token_bytes = int(env.get("FAKE_TOKEN_BYTES", "0"))
        self.crash_on = env.get("FAKE_CRASH_ON", "").encode()
        self.crash_after = int(env["FAKE_CRASH_AFTER"]) if "FAKE_CRASH_AFTER" in env else None
        self.ignore_sigterm = env.get("FAKE_IGNORE_SIGTERM") == "1"
        self.hang = env.get("FAKE_HANG", "")
        self.log_requests = env.get("FAKE_LOG_REQUESTS") == "1"
        self.children = int(env.get("FAKE_CHILDREN", "0"))
        self.prefill_delay = float(env.get("FAKE_PREFILL_DELAY", "0"))
        self.first_request_delay = float(env.get("FAKE_FIRST_REQUEST_DELAY", "0"))


class FakeEngine:
    def __init__(self, args: argparse.Namespace, knobs: Knobs, gpu: FakeGpu) -> None:
        self.args = args
        self.knobs = knobs
        self.gpu = gpu
        self.name = self._served_name(args)
        # Like the real engines: SGLang takes --api-key, vLLM VLLM_API_KEY, llama.cpp API_KEY.
        env_key = {"vllm": "VLLM_API_KEY", "llamacpp": "API_KEY"}.get(args.dialect)
        self.api_key = getattr(args, "api_key", None) or (os.environ.get(env_key) if env_key else None)
        self.ready_at = time.monotonic() + knobs.warmup
        self.stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "cancelled": 0}
        self.peers: set[object] = set()  # the client address of every connection a request came on
        self.tokens_sent = 0
        self.prefixes: set[str] = set()  # the prompts it has prefilled (its "KV cache")
        self.prefix_hits = 0
        self.first_served = False  # FAKE_FIRST_REQUEST_DELAY: paid by the first completion only
        self.prefix_misses = 0
        self.last_headers: dict[str, str] = {}

    @staticmethod
    def _served_name(args: argparse.Namespace) -> str:
        if args.dialect == "sglang":
            return str(args.served_model_name or args.model_path)
        if args.dialect == "vllm":
            return str(args.served_model_name[0] if args.served_model_name else args.model)
        return str(args.model_alias or args.model)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        dialect = self.args.dialect
        # Only routes the real engine has (tests/contract/ holds the fake to them); the
        # fake's own live under /fake/.
        r.add_get("/fake/stats", self.get_stats)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.completions)
        r.add_post("/v1/embeddings", self.embeddings)
        if dialect in ("sglang", "vllm"):  # llama-cpp-python has no health route, rerank, responses
            r.add_get("/health", self.health)
            r.add_post("/v1/rerank", self.rerank)
            r.add_post("/v1/responses", self.responses)
        if dialect == "sglang":
            r.add_get("/health_generate", self.health)
            r.add_post("/flush_cache", self.flush_cache)
        self.gpu.routes(app)
        # Tokenizers: vLLM /tokenize, SGLang /v1/tokenize (and /tokenize), llama-cpp-python /extras/.
        prefix = {"vllm": "", "sglang": "/v1", "llamacpp": "/extras"}[self.args.dialect]
        r.add_post(f"{prefix}/tokenize", self.tokenize)
        r.add_post(f"{prefix}/detokenize", self.detokenize)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        authorized = request.headers.get("Authorization") == f"Bearer {self.api_key}"
        if self.api_key and request.path.startswith("/v1/") and not authorized:
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.knobs.log_requests and request.path.startswith("/v1/"):
            print(
                f"{request.method} {request.path} x-request-id={request.headers.get('X-Request-ID')}",
                flush=True,
            )
        if self.knobs.hang == "request" and request.path.startswith("/v1/"):
            await asyncio.Event().wait()
        if self.gpu.sleeping and request.path.startswith("/v1/"):  # its weights are not on the GPU
            return web.json_response({"error": "the engine is sleeping"}, status=503)
        return await handler(request)  # type: ignore[no-any-return]

    async def health(self, request: web.Request) -> web.Response:
        if self.knobs.hang == "start" or time.monotonic() < self.ready_at:
            return web.Response(status=503, text="warming up")
        return web.Response(text="ok")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"openapi": "3.1.0", "info": {"title": "fake"}})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                **self.stats,
                "connections": len(self.peers),
                "tokens_sent": self.tokens_sent,
                "last_headers": self.last_headers,
                "sleeping": self.gpu.sleeping,
                "prefix_hits": self.prefix_hits,
                "prefix_misses": self.prefix_misses,
                "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                **self.gpu.stats,
            }
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        return web.Response(text="cache flushed")

    async def _read(self, request: web.Request, model: type[Any]) -> Any:
        """The request parsed as this dialect parses it (proto.Refused otherwise)."""
        self.last_headers = dict(request.headers)
        raw = await request.read()
        if self.knobs.crash_on and self.knobs.crash_on in raw:
            print("fake engine: crashing on this request as asked (FAKE_CRASH_ON)", flush=True)
            os._exit(1)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        return proto.parse(self.args.dialect, model, body)

    @staticmethod
    def _refused(exc: proto.Refused) -> web.Response:
        return web.json_response(exc.body, status=exc.status)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        try:
            req = await self._read(request, proto.Chat if chat else proto.Completion)
            n = proto.tokens_asked(self.args.dialect, req, self.knobs.tokens)
        except proto.Refused as exc:
            return self._refused(exc)
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        usage = {"prompt_tokens": proto.prompt_tokens(req), "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        try:
            if self.knobs.first_request_delay and not self.first_served:
                self.first_served = True
                await asyncio.sleep(self.knobs.first_request_delay)
            await self._prefill(req, chat)
            if req.stream:
                return await self._stream(request, req, chat, n, usage)
            try:
                for _ in range(n):
                    await self._emit_token()
            except asyncio.CancelledError:
                self.stats["cancelled"] += 1
                raise
            return web.json_response(self._completion(req, chat, n, usage))
        finally:
            self.stats["in_flight"] -= 1

    async def _prefill(self, req: Any, chat: bool) -> None:
        """With FAKE_PREFILL_DELAY: a prompt that extends one already seen is cached (fast); any
        other pays the delay. Chat: any earlier part of the conversation seen; completions: a
        prompt it extends."""
        if not self.knobs.prefill_delay:
            return
        if chat:
            turns = [json.dumps(m.model_dump(), sort_keys=True) for m in req.messages]
            # a conversation it has prefilled before (the earlier turns: the engine cached
            # them, and the reply it generated, which the client sends back)
            cached = any("\x1e".join(turns[:i]) in self.prefixes for i in range(1, len(turns)))
            self.prefixes.update("\x1e".join(turns[: i + 1]) for i in range(len(turns)))
        else:
            prompt = str(req.prompt)
            cached = any(prompt.startswith(p) for p in self.prefixes)
            self.prefixes.add(prompt)
        if cached:
            self.prefix_hits += 1
        else:
            self.prefix_misses += 1
            await asyncio.sleep(self.knobs.prefill_delay)

    async def _emit_token(self) -> None:
        if self.knobs.token_delay:
            await asyncio.sleep(self.knobs.token_delay)
        self.tokens_sent += 1
        if self.knobs.crash_after is not None and self.tokens_sent > self.knobs.crash_after:
            os._exit(1)

    def _token(self, i: int) -> str:
        text = f"tok{i} "
        return text.ljust(self.knobs.token_bytes, "x") if self.knobs.token_bytes else text

    def _completion(self, req: Any, chat: bool, n: int, usage: dict[str, int]) -> dict[str, Any]:
        text = "".join(self._token(i) for i in range(n)).rstrip()
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": "cmpl-fake",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model or self.name,
            "choices": [choice],
            "usage": usage,
        }

    def _chunk(self, req: Any, chat: bool, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.model or self.name,
            "choices": choices,
        }
        if self.args.dialect == "sglang":
            chunk["usage"] = None  # SGLang serialises the unset field
        return chunk

    async def _stream(
        self, request: web.Request, req: Any, chat: bool, n: int, usage: dict[str, int]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        llama = self.args.dialect == "llamacpp"

        async def event(**choice: Any) -> None:
            if llama:  # llama-cpp-python's chunks always carry logprobs
                choice = {"index": 0, **choice, "logprobs": None}
            await resp.write(b"data: " + json.dumps(self._chunk(req, chat, [choice])).encode() + b"\n\n")

        try:
            if llama and chat:  # llama_chat_format: a first event with the role alone
                await event(index=0, delta={"role": "assistant"}, finish_reason=None)
            for i in range(n):
                await self._emit_token()
                text = self._token(i)
                await event(
                    index=0, **({"delta": {"content": text}} if chat else {"text": text}), finish_reason=None
                )
            if llama:  # and a last one with the finish reason and no text
                last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
                await event(index=0, **last, finish_reason="length")
            if proto.include_usage(self.args.dialect, req):
                last = {**self._chunk(req, chat, []), "usage": usage}
                await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            self.stats["cancelled"] += 1
            raise
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API as vLLM and SGLang serve it: a `response` object, or with `stream`
        typed SSE events (`event: <type>` + `data: {"type": <type>, ...}`) ending with
        `response.completed`; `max_output_tokens` bounds the output."""
        try:
            req = await self._read(request, proto.Responses)
        except proto.Refused as exc:
            return self._refused(exc)
        n = min(req.max_output_tokens or self.knobs.tokens, proto.CONTEXT)
        self.stats["requests"] += 1
        words = [self._token(i) for i in range(n)]
        usage = {"input_tokens": proto.prompt_tokens(req), "output_tokens": n}
        usage["total_tokens"] = usage["input_tokens"] + n
        text = {"type": "output_text", "text": "".join(words).rstrip(), "annotations": []}
        message = {
            "type": "message",
            "id": "msg_fake",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
        done = {"id": "resp_fake", "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": req.model or self.name, "output": [message],
                "usage": usage}  # fmt: skip
        if not req.stream:
            for _ in range(n):
                await self._emit_token()
            return web.json_response(done)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def event(kind: str, **fields: Any) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode())

        await event("response.created", response={**done, "status": "in_progress", "output": []})
        for word in words:
            await self._emit_token()
            await event(
                "response.output_text.delta", item_id="msg_fake", output_index=0, content_index=0, delta=word
            )
        await event("response.completed", response=done)
        return resp

    async def tokenize(self, request: web.Request) -> web.Response:
        """One token a byte. vLLM and SGLang read `prompt`, llama-cpp-python `input`."""
        body = await request.json()
        text = body.get("input" if self.args.dialect == "llamacpp" else "prompt", "")
        tokens = list(str(text).encode())
        if self.args.dialect == "llamacpp":
            return web.json_response({"tokens": tokens})
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": proto.CONTEXT})

    async def detokenize(self, request: web.Request) -> web.Response:
        text = bytes((await request.json())["tokens"]).decode(errors="replace")
        return web.json_response({"prompt" if self.args.dialect == "vllm" else "text": text})

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            req = await self._read(request, proto.Embedding)
        except proto.Refused as exc:
            return self._refused(exc)
        items = req.input if isinstance(req.input, list) else [req.input]
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": i, "embedding": [float(len(str(x)) % 7), 0.5, -0.25, 1.0]}
            for i, x in enumerate(items)
        ]
        if self.args.dialect == "vllm" and req.encoding_format == "base64":
            for item in data:
                item["embedding"] = base64.b64encode(struct.pack("<4f", *item["embedding"])).decode()
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": req.model or self.name,
                "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
            }
        )

    async def rerank(self, request: web.Request) -> web.Response:
        try:
            req = await self._read(request, proto.Rerank)
        except proto.Refused as exc:
            return self._refused(exc)
        results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(req.documents))]
        return web.json_response({"results": results, "model": req.model or self.name})


def spawn_children(count: int, ignore_sigterm: bool) -> list[subprocess.Popen[bytes]]:
    code = "import signal, time\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(3600)\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


# Where each real engine reads its HTTP keep-alive (uvicorn's 5 s otherwise).
KEEP_ALIVE_ENV = {"sglang": "SGLANG_TIMEOUT_KEEP_ALIVE", "vllm": "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"}


def keep_alive(dialect: str) -> int:
    variable = KEEP_ALIVE_ENV.get(dialect)
    return int(os.environ.get(variable, "5")) if variable else 5  # int(): the engines' own parse


async def serve(engine: FakeEngine, host: str, port: int, uds: str | None = None) -> None:
    # Like SGLang, abort a request whose client went away (streaming or not).
    runner = web.AppRunner(
        engine.app(),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        keepalive_timeout=keep_alive(engine.args.dialect),
    )
    await runner.setup()
    site: web.BaseSite
    if uds:  # like vLLM's --uds: host and port ignored; a file already there fails the bind
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(uds)
        site = web.SockSite(runner, sock)
        where = f"unix:{uds}"
    else:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        where = f"{host}:{port}"
    await site.start()
    print(f"fake engine '{engine.name}' ({engine.args.dialect}) serving on {where}", flush=True)
    stop = asyncio.Event()
    if not engine.knobs.ignore_sigterm:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print("fake engine: SIGTERM, shutting down", flush=True)
    await runner.cleanup()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    knobs = Knobs(dict(os.environ))
    if knobs.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake engine starting: {' '.join(argv)}", flush=True)
    spawn_children(knobs.children, knobs.ignore_sigterm)
    if knobs.exit_during_start is not None:
        print("fake engine: failing during start as asked (FAKE_EXIT_DURING_START)", flush=True)
        return int(knobs.exit_during_start)
    time.sleep(knobs.start_delay)
    gpu = FakeGpu(args, dict(os.environ))
    error = gpu.claim()  # like the real engines: the weights and KV cache take their share first
    if error is not None:
        print(error, flush=True)
        return 1
    host = args.host or "0.0.0.0"
    try:
        asyncio.run(serve(FakeEngine(args, knobs, gpu), host, args.port, getattr(args, "uds", None)))
    finally:
        gpu.release()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
