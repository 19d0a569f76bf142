"""The ``tokenrelay`` command: serve, chat, models, mock-upstream."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tokenrelay.config import ConfigError, ServerConfig, check_tls, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokenrelay: a streaming AI gateway.")
err = Console(stderr=True)
DEFAULT_URL = "http://127.0.0.1:8080"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
keys_app = typer.Typer(
    no_args_is_help=True, help="API keys: create, list, revoke (in the configured database)."
)
app.add_typer(keys_app, name="keys")


def _config_or_exit(path: str | None) -> Any:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None


ConfigOption = Annotated[str | None, typer.Option("--config", "-c", help="YAML config file")]


audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit trail: verify, tail")
app.add_typer(audit_app, name="audit")


def _with_store(database_url: str | None, work: Any) -> Any:
    """Run ``work(store)`` against the database (``server.database_url``; None: the default file)."""
    from tokenrelay.store import Store

    async def run() -> Any:
        store = Store(database_url)
        try:
            await store.start()
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(run())


@audit_app.command("verify")
def audit_verify(config: ConfigOption = None) -> None:
    """Check the whole hash chain; names the first record edited, inserted, deleted or moved."""
    from tokenrelay.records import verify

    server = _config_or_exit(config).server
    key = os.environ.get(server.audit_key_env)
    checked, problem = _with_store(
        server.database_url, lambda store: verify(store, key.encode() if key else None)
    )
    if problem:
        err.print(f"[red]audit trail broken after {checked} good records:[/red] {problem}")
        raise typer.Exit(1)
    err.print(f"audit trail intact: {checked} records")


@audit_app.command("tail")
def audit_tail(
    count: Annotated[int, typer.Option("-n", help="how many of the latest records")] = 20,
    config: ConfigOption = None,
) -> None:
    """The latest audit records, one JSON object per line."""
    from tokenrelay.records import tail

    database_url = _config_or_exit(config).server.database_url
    for record in _with_store(database_url, lambda store: tail(store, count)):
        print(json.dumps(record))


@app.command()
def usage(
    key: Annotated[str | None, typer.Option("--key", help="a key id (default: every key)")] = None,
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and cost per model, from the usage records."""
    from tokenrelay import records

    body = _with_store(_config_or_exit(config).server.database_url, lambda store: records.usage(store, key))
    table = Table("model", "requests", "prompt tokens", "completion tokens", "cost")
    for model, row in [*body["by_model"].items(), ("total", body)]:
        cells = (row["requests"], row["prompt_tokens"], row["completion_tokens"])
        table.add_row(model, *(str(c) for c in cells), f"{row['cost']:.6f}")
    Console().print(table)


@app.command()
def cost(
    requests: Annotated[int, typer.Option(help="requests in the workload")],
    prompt_tokens: Annotated[int, typer.Option(help="prompt tokens per request")],
    completion_tokens: Annotated[int, typer.Option(help="completion tokens per request")],
    model: Annotated[str, typer.Option(help="the model the prices are looked up for")] = "*",
    config: ConfigOption = None,
) -> None:
    """Compare request-based and token-based pricing of each plan for a workload."""
    cfg = _config_or_exit(config)
    table = Table("plan", "per request", "request-based", "token-based", "cheaper")
    for name, plan in cfg.plans.items():
        flat = plan.price_per_request
        price = plan.prices.get(model) or plan.prices.get("*")
        by_request = None if flat is None else requests * flat
        by_tokens = (
            None
            if price is None
            else requests * (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
        )
        cheaper = ""
        if by_request is not None and by_tokens is not None:
            cheaper = "request-based" if by_request < by_tokens else "token-based"
        table.add_row(
            name,
            "" if flat is None else f"{flat:g}",
            "" if by_request is None else f"{by_request:.4f}",
            "" if by_tokens is None else f"{by_tokens:.4f}",
            cheaper,
        )
    Console().print(table)


@keys_app.command("create")
def keys_create(
    plan: Annotated[str, typer.Option(help="a plan from the config (default plans: free, pro, premium)")],
    models: Annotated[str | None, typer.Option(help="comma-separated models (default: the plan's)")] = None,
    budget: Annotated[float | None, typer.Option(help="spending cap in the pricing's currency")] = None,
    name: Annotated[str | None, typer.Option(help="a label")] = None,
    config: ConfigOption = None,
) -> None:
    """Create a key; its secret is printed once and never stored."""
    cfg = _config_or_exit(config)
    if plan not in cfg.plans:
        err.print(f"[red]unknown plan {plan!r}[/red]; plans: {', '.join(cfg.plans)}")
        raise typer.Exit(2)
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    unknown = [m for m in model_list or [] if cfg.model(m) is None]
    if unknown:
        err.print(f"[red]unknown models:[/red] {', '.join(unknown)}")
        raise typer.Exit(2)

    key, secret = _with_store(
        cfg.server.database_url, lambda store: store.create_key(plan, model_list, budget, name)
    )
    err.print(f"created {key.id} (plan {plan}); the key is shown once:")
    print(secret)


@keys_app.command("list")
def keys_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per key")] = False,
) -> None:
    """Every key, revoked ones included (never the secrets)."""
    keys = _with_store(_config_or_exit(config).server.database_url, lambda store: store.keys())
    if as_json:
        for key in keys:
            print(json.dumps(key.public()))
        return
    table = Table("id", "prefix", "name", "plan", "models", "budget", "revoked")
    for key in keys:
        table.add_row(
            key.id,
            key.prefix + "…",
            key.name or "",
            key.plan,
            ",".join(key.models) if key.models else "(plan)",
            "" if key.budget is None else f"{key.budget:g}",
            "yes" if key.revoked_at else "",
        )
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOption = None) -> None:
    """Revoke a key by id (replicas stop accepting it within seconds)."""
    if not _with_store(_config_or_exit(config).server.database_url, lambda store: store.revoke(key_id)):
        err.print(f"[red]no active key {key_id}[/red]")
        raise typer.Exit(1)
    err.print(f"revoked {key_id}")


def _raise_nofile() -> int:
    """Raise the open-file soft limit to the hard limit; return the soft limit now in force.

    Every open stream holds two descriptors (the client's socket and the upstream's), so the usual soft
    limit of 1,024 caps a worker at about 500 streams. Raising the soft limit up to the hard one needs no
    privilege; the hard limit is the operator's (systemd ``LimitNOFILE=``, docs/deployment.md).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


@app.command()
def serve(
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML config file")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8080)")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes sharing the port")] = None,
    http_server: Annotated[
        str | None,
        typer.Option("--server", help="builtin (default; HTTP/1.1 + WebSocket) or granian (HTTP/2 too)"),
    ] = None,
    grpc_port: Annotated[int | None, typer.Option("--grpc-port", help="also serve the gRPC API here")] = None,
    ssl_certfile: Annotated[str | None, typer.Option("--ssl-certfile", help="TLS certificate (PEM)")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option("--ssl-keyfile", help="TLS private key (PEM)")] = None,
    allow_open: Annotated[
        bool, typer.Option("--allow-open", help="serve with no API keys on a non-loopback address")
    ] = False,
) -> None:
    """Serve the gateway (with no config: the embedded model as 'tiny')."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None
    server = cfg.server
    if host is not None:
        server.host = host
    if port is not None:
        server.port = port
    if workers is not None:
        server.workers = workers
    if http_server is not None:
        if http_server not in ("granian", "builtin"):
            err.print(f"[red]--server must be granian or builtin, not {http_server!r}[/red]")
            raise typer.Exit(2)
        server.http_server = http_server  # type: ignore[assignment]
    if grpc_port is not None:
        server.grpc_port = grpc_port
    if ssl_certfile is not None:
        server.ssl_certfile = ssl_certfile
    if ssl_keyfile is not None:
        server.ssl_keyfile = ssl_keyfile
    try:
        check_tls(server, "command line")
    except ConfigError as exc:
        err.print(f"[red]config error:[/red] {exc}")
        raise typer.Exit(2) from None
    if allow_open:
        server.allow_open = True
    try:
        active = len(_with_store(server.database_url, lambda store: store.keys(include_revoked=False)))
    except Exception as exc:
        err.print(f"[red]database error:[/red] {server.database_url or 'tokenrelay.db'}: {exc}")
        raise typer.Exit(2) from None
    if not active and not cfg.jwt_issuers:
        if server.host not in LOOPBACK and not server.allow_open:
            err.print(
                f"[red]refusing to serve {server.host} with no API keys:[/red] anyone who can reach it could "
                "use every model. Create a key (tokenrelay keys create --plan pro), or pass --allow-open."
            )
            raise typer.Exit(2)
        err.print("[yellow]no API keys: serving open (every request is admitted)[/yellow]")
    os.environ["TOKENRELAY_CONFIG_JSON"] = dump_config(cfg)
    names = ", ".join(f"{m.name} ({m.provider})" for m in cfg.models)
    scheme = "https" if server.ssl_certfile else "http"
    grpc_note = f", gRPC on {server.host}:{server.grpc_port}" if server.grpc_port else ""
    err.print(
        f"tokenrelay on {scheme}://{server.host}:{server.port}{grpc_note} with {server.workers} worker(s);"
        f" models: {names}"
    )
    # granian admits at most `backpressure` requests per worker at once (default backlog // workers);
    # for a streaming gateway that is a cap on open streams, so the bound is the descriptors instead
    nofile = _raise_nofile()
    backpressure = max(server.backlog // max(1, server.workers), (nofile - 256) // 2)
    metrics_dir = _metrics_dir(server.workers)
    try:
        if server.http_server == "builtin":
            from tokenrelay.app import create_app
            from tokenrelay.transport import server as builtin

            builtin.run(
                create_app,
                server.host,
                server.port,
                workers=server.workers,
                backlog=server.backlog,
                ssl_certfile=server.ssl_certfile,
                ssl_keyfile=server.ssl_keyfile,
                max_connections=backpressure,  # a client and an upstream socket each, within the limit
            )
        else:
            _granian(server, backpressure)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _metrics_dir(workers: int) -> str | None:
    """With several workers, their Prometheus counters and histograms go to files in a fresh directory
    (prometheus_client's multiprocess mode), so ``/metrics`` from any worker adds up all of them. It
    must be set before a worker imports prometheus_client; a ``PROMETHEUS_MULTIPROC_DIR`` the operator
    set is used as it is (and is theirs to empty between runs). Returns the directory to remove."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="tokenrelay-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _granian(server: ServerConfig, backpressure: int) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian(
        "tokenrelay.app:create_app",
        factory=True,
        address=server.host,
        port=server.port,
        interface=Interfaces.ASGI,
        workers=server.workers,
        loop=Loops.uvloop,
        backlog=server.backlog,
        backpressure=backpressure,
        log_access=False,
        websockets=True,
        ssl_cert=Path(server.ssl_certfile) if server.ssl_certfile else None,
        ssl_key=Path(server.ssl_keyfile) if server.ssl_keyfile else None,
    ).serve()


def _models(url: str) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=10) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


@app.command()
def models(url: Annotated[str, typer.Option(help="gateway URL")] = DEFAULT_URL) -> None:
    """List the models a gateway serves."""
    try:
        names = _models(url)
    except OSError as exc:
        err.print(f"[red]cannot reach {url}:[/red] {exc}")
        raise typer.Exit(1) from None
    table = Table("model")
    for name in names:
        table.add_row(name)
    Console().print(table)


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="what to ask")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="model (default: the first served)")
    ] = None,
    url: Annotated[str, typer.Option(help="gateway URL")] = DEFAULT_URL,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="TOKENRELAY_API_KEY", help="API key")] = None,
) -> None:
    """Stream one answer, printing tokens as they arrive."""
    try:
        code = asyncio.run(_chat(prompt, model, url, system, max_tokens, api_key))
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


async def _chat(
    prompt: str, model: str | None, url: str, system: str | None, max_tokens: int | None, api_key: str | None
) -> int:
    import aiohttp

    from tokenrelay.sse import SSEParser

    if model is None:
        try:
            model = (await asyncio.to_thread(_models, url))[0]
        except (OSError, IndexError) as exc:
            err.print(f"[red]cannot list models at {url}:[/red] {exc}")
            return 1
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    out = sys.stdout
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(
                f"{url.rstrip('/')}/v1/chat/completions", json=body, headers=headers
            ) as resp:
                if resp.status != 200:
                    data = await resp.json(content_type=None)
                    err.print(f"[red]error {resp.status}:[/red] {data.get('error', {}).get('message', data)}")
                    return 1
                parser = SSEParser()
                async for raw in resp.content.iter_any():
                    for ev in parser.feed(raw):
                        if ev.data == b"[DONE]":
                            out.write("\n")
                            return 0
                        chunk = json.loads(ev.data)
                        if "error" in chunk:
                            err.print(f"\n[red]stream error:[/red] {chunk['error'].get('message')}")
                            return 1
                        for choice in chunk.get("choices", []):
                            text = choice.get("delta", {}).get("content")
                            if text:
                                out.write(text)
                                out.flush()
        except aiohttp.ClientError as exc:
            err.print(f"[red]cannot reach {url}:[/red] {exc}")
            return 1
    err.print("\n[red]the stream ended without [DONE][/red]")
    return 1


@app.command("mock-upstream")
def mock_upstream(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9100,
    options: Annotated[
        str, typer.Option(help="default mock options as JSON, e.g. '{\"tokens_per_second\": 20}'")
    ] = "{}",
) -> None:
    """Serve the mock model as an OpenAI-compatible upstream (with fault injection)."""
    from tokenrelay.mock_server import serve as serve_mock

    err.print(f"mock upstream on http://{host}:{port}/v1")
    serve_mock(host, port, json.loads(options))


def main() -> None:
    app()
