"""A misbehaving engine: answers each request with raw bytes chosen by its prompt.

    python tests/scripted_engine.py sglang --port P [any other flags, ignored]
    python tests/scripted_engine.py vllm --uds PATH [...]     (on a Unix socket, as vLLM is run)

It stands in for no real engine: it is the peer that does what real engines
should not (odd headers, gzip nobody asked for, answers cut mid-line or
written three bytes at a time, plain-text 500s, huge bodies), so the daemon's
handling of each is tested. `GET /health` answers 200. `POST /v1/...` with a
JSON body answers with the script named by its `prompt` (or the first
message's content); `GET /scripted/requests` says how many requests came.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from collections.abc import Awaitable, Callable

Script = Callable[[asyncio.StreamWriter, str], Awaitable[None]]
SERVED = "served-name"  # the name the daemon is told this engine serves


def _doc(text: str, model: str = SERVED, usage: int = 7) -> bytes:
    body: dict[str, object] = {"id": "x", "object": "text_completion", "model": model}
    body["choices"] = [{"index": 0, "text": text}]
    body["usage"] = {"prompt_tokens": 2, "completion_tokens": usage - 2, "total_tokens": usage}
    return json.dumps(body).encode()


def _event(text: str, model: str = SERVED) -> bytes:
    chunk = {"id": "x", "object": "text_completion", "model": model, "choices": [{"index": 0, "text": text}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _head(status: str, headers: list[str]) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


async def hop(w: asyncio.StreamWriter, _: str) -> None:
    body = _doc("hop")
    w.write(_head("200 OK", [
        "Content-Type: application/json", "Connection: keep-alive, X-Hop-Secret", "X-Hop-Secret: 1",
        "Proxy-Connection: keep-alive", "Keep-Alive: timeout=5", "X-Kept: yes",
        f"Content-Length: {len(body)}",
    ]) + body)  # fmt: skip


async def no_content(w: asyncio.StreamWriter, _: str) -> None:
    w.write(_head("204 No Content", ["X-Kept: yes"]))


async def gzip_doc(w: asyncio.StreamWriter, _: str) -> None:
    body = gzip.compress(_doc("zipped", usage=11))
    w.write(_head("200 OK", [
        "Content-Type: application/json", "Content-Encoding: gzip", f"Content-Length: {len(body)}",
    ]) + body)  # fmt: skip


async def gzip_stream(w: asyncio.StreamWriter, _: str) -> None:
    body = gzip.compress(b"".join(_event(f"t{i} ") for i in range(5)) + b"data: [DONE]\n\n")
    w.write(_head("200 OK", [
        "Content-Type: text/event-stream", "Content-Encoding: gzip", f"Content-Length: {len(body)}",
    ]) + body)  # fmt: skip


async def split_stream(w: asyncio.StreamWriter, _: str) -> None:
    """Ten events written three bytes at a time."""
    body = b"".join(_event(f"t{i} ") for i in range(10)) + b"data: [DONE]\n\n"
    w.write(_head("200 OK", ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]))
    for i in range(0, len(body), 3):
        piece = body[i : i + 3]
        w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await w.drain()
        await asyncio.sleep(0.0005)
    w.write(b"0\r\n\r\n")


async def partial_then_die(w: asyncio.StreamWriter, _: str) -> None:
    """One whole event, then half of the next, then the connection breaks."""
    w.write(_head("200 OK", ["Content-Type: text/event-stream", "Transfer-Encoding: chunked"]))
    data = _event("hello ") + b'data: {"id": "x", "choices": [{"text": "hel'
    w.write(b"%x\r\n%s\r\n" % (len(data), data))
    await w.drain()
    await asyncio.sleep(0.05)
    w.transport.abort()


async def huge(w: asyncio.StreamWriter, prompt: str) -> None:
    """A JSON answer of `huge:<MiB>` mebibytes; `huge-chunked:` sends no Content-Length."""
    mib = int(prompt.split(":")[1])
    filler = b"x" * (1 << 20)
    prefix, suffix = b'{"model": "served-name", "choices": [{"text": "', b'"}]}'
    size = len(prefix) + mib * len(filler) + len(suffix)
    chunked = prompt.startswith("huge-chunked")
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    w.write(_head("200 OK", ["Content-Type: application/json", length]))
    for part in (prefix, *([filler] * mib), suffix):
        w.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        await w.drain()
    if chunked:
        w.write(b"0\r\n\r\n")


async def text_500(w: asyncio.StreamWriter, _: str) -> None:
    body = b"Internal Server Error"
    headers = ["Content-Type: text/plain", f"Content-Length: {len(body)}"]
    w.write(_head("500 Internal Server Error", headers) + body)


async def json_422(w: asyncio.StreamWriter, _: str) -> None:
    body = json.dumps({"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]})
    w.write(_head("422 Unprocessable Entity", [
        "Content-Type: application/json", f"Content-Length: {len(body)}",
    ]) + body.encode())  # fmt: skip


async def ok(w: asyncio.StreamWriter, _: str) -> None:
    body = _doc("ok")
    w.write(_head("200 OK", ["Content-Type: application/json", f"Content-Length: {len(body)}"]) + body)


SCRIPTS: dict[str, Script] = {
    "hop": hop, "no-content": no_content, "gzip-doc": gzip_doc, "gzip-stream": gzip_stream,
    "split-stream": split_stream, "partial-then-die": partial_then_die, "huge": huge, "huge-chunked": huge,
    "text-500": text_500, "json-422": json_422,
}  # fmt: skip
requests_seen = 0


def _prompt(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    if isinstance(doc.get("prompt"), str):
        return str(doc["prompt"])
    messages = doc.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("content", ""))
    return ""


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Answer one request; False when the connection is done."""
    global requests_seen
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    lines = head.decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    fields = (h.partition(":") for h in lines[1:])
    length = next((int(v) for k, _, v in fields if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    if method == "GET" and path == "/scripted/requests":
        payload = str(requests_seen).encode()
        writer.write(_head("200 OK", [f"Content-Length: {len(payload)}"]) + payload)
    elif method == "GET":
        writer.write(_head("200 OK", ["Content-Length: 2"]) + b"ok")
    else:
        requests_seen += 1
        prompt = _prompt(body)
        await SCRIPTS.get(prompt.split(":")[0], ok)(writer, prompt)
    await writer.drain()
    return not writer.transport.is_closing()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await serve_one(reader, writer):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(argv: list[str]) -> None:
    if "--uds" in argv:  # as the daemon launches vLLM, which it stands in for
        path = argv[argv.index("--uds") + 1]
        server = await asyncio.start_unix_server(handle, path)
        print(f"scripted engine serving on unix:{path}", flush=True)
    else:
        port = int(argv[argv.index("--port") + 1])
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print(f"scripted engine serving on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
