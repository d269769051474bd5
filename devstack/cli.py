"""The `mailqueue` command: the embedded dev stack and operator tasks.

    mailqueue dev        Temporal dev server + worker + API + SMTP catcher, one Ctrl-C stops all
    mailqueue mail       list the mail the dev catcher caught (--show N for one message, --raw for its source)
    mailqueue migrate    apply database migrations to MAILQUEUE_DATABASE_URL
    mailqueue templates  load the templates folder (a new version of every changed template)
    mailqueue rotate-secrets  re-encrypt stored secrets (senders', webhooks') with the newest MAILQUEUE_SECRET_KEY
    mailqueue worker     run a worker          mailqueue api   serve the HTTP API
    mailqueue bounces    the bounce domain's SMTP listener (bounces and unsubscribe mail)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from devstack import supervisor
from devstack.catcher import MessageView, load_directory
from mailqueue.config import HTTP_KEEP_ALIVE_SECONDS, get_settings


def dev_cmd(args: argparse.Namespace) -> int:
    return supervisor.dev(args, get_settings())


def mail_cmd(args: argparse.Namespace) -> int:
    folder = args.data_dir / "mail"
    messages = load_directory(folder) if folder.is_dir() else []
    if args.raw and args.show is None:
        print("--raw goes with --show N", file=sys.stderr)
        return 2
    if args.show is not None:
        if not 0 <= args.show < len(messages):
            print(f"no message {args.show}: {len(messages)} caught", file=sys.stderr)
            return 1
        caught = messages[args.show]
        sys.stdout.write(caught.data.decode("utf-8", "replace") if args.raw else _readable(caught.view()))
        return 0
    if not messages:
        print(f"no mail caught yet (the dev catcher keeps it in {folder})")
        return 0
    for i, m in enumerate(messages):
        msg = m.message
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.received_at))
        print(f"{i:4d}  {when}  from {msg['From']}  to {msg['To']}  {msg['Subject']!r}")
    where = "" if args.data_dir == Path(".mailqueue") else f" --data-dir {args.data_dir}"
    print(f"{len(messages)} message(s); show one with: mailqueue mail{where} --show N (add --raw for its source)")
    return 0


def _readable(view: MessageView) -> str:
    """A caught message for a terminal: headers decoded, the text part (or the HTML part as text), the attachments."""
    from mailqueue.templating import html_to_text

    width = max((len(name) for name, _ in view.headers), default=0) + 1
    lines = [f"{name + ':':<{width}} {value}" for name, value in view.headers]
    if view.text is not None:
        body = view.text
    elif view.html is not None:
        body = "(no text part: the HTML part as text)\n\n" + html_to_text(view.html)
    else:
        body = "(no text or HTML part)\n"
    lines += ["", body.rstrip("\n"), ""]
    if view.parts:
        lines.append(f"attachments ({len(view.parts)}):")
        lines += [
            f"  {p.filename}  {p.content_type}  {len(p.data)} bytes" + ("  (inline, cid:" + p.content_id + ")" if p.inline and p.content_id else "")
            for p in view.parts
        ]
    return "\n".join(lines) + "\n"


def templates_cmd(args: argparse.Namespace) -> int:
    settings = get_settings()
    directory = (args.dir or supervisor.templates_dir(settings)).resolve()
    print(f"loading templates from {directory} into {supervisor.safe_url(settings.database_url)}", flush=True)
    result = supervisor.load_templates(settings.database_url, directory)
    supervisor.print_reload(result, indent="  ")
    return 1 if result.problems else 0


def migrate_cmd(args: argparse.Namespace) -> int:
    from mailqueue.db import migrate

    url = get_settings().database_url
    print(f"migrating {supervisor.safe_url(url)} to the latest schema", flush=True)
    try:
        migrate(url)
    except Exception as exc:  # noqa: BLE001 - one line for the operator, not a traceback
        print(f"migration failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    print("done")
    return 0


def rotate_secrets_cmd(args: argparse.Namespace) -> int:
    """Re-encrypt every stored secret (sender settings, webhook endpoints) with the first key of MAILQUEUE_SECRET_KEY."""
    from mailqueue.crypto import SecretBox, SecretKeyError
    from mailqueue.db import create_engine, sessionmaker
    from mailqueue.senders import rotate_secrets

    settings = get_settings()
    try:
        box = SecretBox.from_settings(settings)
    except SecretKeyError as exc:
        print(f"cannot rotate: {exc}", file=sys.stderr)
        return 1

    async def run() -> int:
        engine = create_engine(settings.database_url)
        try:
            return await rotate_secrets(sessionmaker(engine), box)
        finally:
            await engine.dispose()

    print(f"re-encrypting stored secrets in {supervisor.safe_url(settings.database_url)} with the newest key", flush=True)
    try:
        count = asyncio.run(run())
    except SecretKeyError as exc:
        print(f"stopped, nothing changed: {exc}", file=sys.stderr)
        return 1
    print(f"done: {count} row(s) re-encrypted (sender settings, webhook endpoints); the older keys can now be removed from MAILQUEUE_SECRET_KEY")
    return 0


def worker_cmd(args: argparse.Namespace) -> int:
    import worker

    asyncio.run(worker.main())
    return 0


def bounces_cmd(args: argparse.Namespace) -> int:
    """The SMTP listener of MAILQUEUE_BOUNCE_DOMAIN (mailqueue/bounce_server.py): the database only, no Temporal."""
    from mailqueue.bounce_server import serve
    from mailqueue.logs import configure_logging

    settings = get_settings()
    if not settings.bounce_domain:
        print("mailqueue bounces: set MAILQUEUE_BOUNCE_DOMAIN (the domain whose MX points at this listener)", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"mailqueue bounces: cannot listen on {settings.bounce_host}:{settings.bounce_port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def api_cmd(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.app:app", host=args.host, port=args.port, timeout_keep_alive=HTTP_KEEP_ALIVE_SECONDS)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailqueue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    # `make dev` passes API_PORT=…, TEMPORAL_PORT=…, UI_PORT=…, SMTP_PORT=…, MAIL_PORT=…, BOUNCE_PORT=… and ARGS="…" here.
    p = sub.add_parser(
        "dev", help="run the embedded stack: Temporal, worker, API, SMTP catcher",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=Path(".mailqueue"), help="state: databases, keys, caught mail, logs")
    p.add_argument("--host", default="127.0.0.1", help="where every part listens")
    p.add_argument("--api-port", type=int, default=8000, help="the HTTP API and its /docs")
    p.add_argument("--temporal-port", type=int, default=7233, help="Temporal's gRPC")
    p.add_argument("--ui-port", type=int, default=8233, help="the Temporal Web UI")
    p.add_argument("--smtp-port", type=int, default=1025, help="the SMTP catcher")
    p.add_argument("--mail-port", type=int, default=8025, help="the caught-mail page")
    p.add_argument("--bounce-port", type=int, default=2525, help="the bounce listener (bounces and unsubscribe mail by SMTP)")
    p.set_defaults(func=dev_cmd)

    p = sub.add_parser("mail", help="list mail caught by the dev stack")
    p.add_argument("--data-dir", type=Path, default=Path(".mailqueue"))
    p.add_argument("--show", type=int, default=None, metavar="N", help="print message N: headers and text decoded, attachments listed")
    p.add_argument("--raw", action="store_true", help="with --show: print its source as it came")
    p.set_defaults(func=mail_cmd)

    p = sub.add_parser("migrate", help="apply database migrations")
    p.set_defaults(func=migrate_cmd)
    p = sub.add_parser("templates", help="load the templates folder into the database")
    p.add_argument("--dir", type=Path, default=None, help="default: MAILQUEUE_TEMPLATES_DIR, else ./templates")
    p.set_defaults(func=templates_cmd)
    p = sub.add_parser("rotate-secrets", help="re-encrypt stored secrets (sender settings, webhook endpoints) with the newest MAILQUEUE_SECRET_KEY")
    p.set_defaults(func=rotate_secrets_cmd)
    p = sub.add_parser("worker", help="run a worker (same as python worker.py)")
    p.set_defaults(func=worker_cmd)
    p = sub.add_parser("bounces", help="run the bounce domain's SMTP listener (MAILQUEUE_BOUNCE_DOMAIN, _HOST, _PORT)")
    p.set_defaults(func=bounces_cmd)
    p = sub.add_parser("api", help="serve the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=api_cmd)

    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
