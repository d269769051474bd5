"""Renders templates in child processes, each render bounded in CPU time, wall time and memory.

The sandbox (`mailqueue.templating`) budgets what a template may build and how often it may
loop; the limits here bound whatever those budgets do not foresee, and keep a render off the
event loop of the API and of the worker. Each child renders one job at a time:

- memory: `RLIMIT_AS` (settings.render_memory_mb), set once in the child; a MemoryError ends
  the render and the child (a fresh one takes its place).
- CPU time: `RLIMIT_CPU`, moved to "now + settings.render_cpu_seconds" before each job; the
  kernel's SIGXCPU ends the render and the child.
- wall time: the parent waits settings.render_timeout_seconds, then kills the child.

A child is a new interpreter (`python -c ...`, spawn-style), never a fork: the API and the worker
run threads (Temporal's core among them), which a fork would copy mid-flight. Not through
multiprocessing either: its spawn and forkserver children re-run the parent's main script
(`python worker.py`: the whole worker's imports). A child's environment holds no MAILQUEUE_*
setting, so no secret is within reach of a template; it talks to the parent over a socket pair.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from mailqueue.contracts import Content
from mailqueue.errors import TemplateError
from mailqueue.templating import MissingVariables, RenderJob, TemplateEngine, TemplateLimitError

if TYPE_CHECKING:
    from mailqueue.config import Settings

log = logging.getLogger("mailqueue.render_pool")

READY = b"ready"
START_SECONDS = 60.0  # a new child imports the template machinery (about half a second; more on a busy machine)


class RenderPoolError(RuntimeError):
    """The pool itself failed (not started, a bug in a child): not the template's fault."""


@dataclass(frozen=True)
class Limits:
    """The pool's size and each render's bounds (from settings.render_*), and how a breach of each reads."""

    processes: int
    timeout_seconds: float
    cpu_seconds: int
    memory_mb: int
    default_locale: str = "en"

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            processes=settings.render_processes,
            timeout_seconds=settings.render_timeout_seconds,
            cpu_seconds=settings.render_cpu_seconds,
            memory_mb=settings.render_memory_mb,
            default_locale=settings.default_locale,
        )

    def cpu_breach(self) -> TemplateLimitError:
        return TemplateLimitError(f"the template render exceeded its CPU time limit ({self.cpu_seconds} s)", "cpu")

    def memory_breach(self) -> TemplateLimitError:
        return TemplateLimitError(f"the template render exceeded its memory limit ({self.memory_mb} MB)", "memory")

    def time_breach(self) -> TemplateLimitError:
        return TemplateLimitError(f"the template render exceeded its time limit ({self.timeout_seconds:g} s)", "time")

    def death(self) -> TemplateLimitError:
        return TemplateLimitError(
            "the template render was stopped: its process died (over its CPU time or memory limit: "
            f"{self.cpu_seconds} s, {self.memory_mb} MB)", "process",
        )


# --- the child -----------------------------------------------------------------------------------


class _OutOfCpu(BaseException):
    """Raised by SIGXCPU. A BaseException: the engine turns every Exception into a template error."""


def _out_of_cpu(signum: int, frame: Any) -> None:
    raise _OutOfCpu


def _cpu_limit(seconds: int | None) -> None:
    """The soft RLIMIT_CPU: `seconds` from now (None: none). The hard limit stays where it is: a
    process can lower it but never raise it again."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = hard if seconds is None else math.ceil(usage.ru_utime + usage.ru_stime) + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _error(exc: TemplateError) -> dict[str, Any]:
    """A template error as plain data (see _read_error)."""
    if isinstance(exc, TemplateLimitError):
        return {"type": "limit", "message": str(exc), "limit": exc.limit}
    if isinstance(exc, MissingVariables):
        return {"type": "missing", "names": [str(n) for n in exc.names]}
    return {"type": "template", "message": str(exc)}


def _read_error(value: Any) -> TemplateError:
    """The error a child reported, rebuilt from plain data only."""
    if not isinstance(value, dict):
        raise RenderPoolError("a render process answered something that is not an error")
    if value.get("type") == "limit":
        return TemplateLimitError(str(value.get("message", "")), str(value.get("limit", "")))
    if value.get("type") == "missing":
        return MissingVariables([str(n) for n in value.get("names", [])])
    return TemplateError(str(value.get("message", "")))


def _answer(engine: TemplateEngine, payload: bytes, limits: Limits) -> tuple[bytes, bool]:
    """One job's reply, and whether this child must stop after sending it.

    Replies are JSON, never pickle: a child runs what untrusted authors wrote, and whatever it
    sends back is read as plain data only (strings), so even a child that escaped the sandbox
    cannot make the parent (which holds the secrets) run anything."""
    _cpu_limit(limits.cpu_seconds)
    try:
        job: RenderJob = pickle.loads(payload)  # from the parent, which is trusted
        content = engine.run(job)
        reply: tuple[dict[str, Any], bool] = ({"kind": "ok", "subject": content.subject, "html": content.html, "text": content.text}, False)
    except TemplateError as exc:
        reply = ({"kind": "refused", "error": _error(exc)}, False)
    except _OutOfCpu:
        reply = ({"kind": "stopped", "error": _error(limits.cpu_breach())}, True)
    except MemoryError:
        reply = ({"kind": "stopped", "error": _error(limits.memory_breach())}, True)
    except Exception as exc:  # noqa: BLE001 - a bug, reported to the parent rather than hidden
        reply = ({"kind": "failed", "error": f"{type(exc).__name__}: {exc}"}, False)
    finally:
        _cpu_limit(None)
    return json.dumps(reply[0]).encode(), reply[1]


def _content(answer: dict[str, Any]) -> Content:
    parts = {name: answer.get(name) for name in ("subject", "html", "text")}
    if not isinstance(parts["subject"], str) or not all(v is None or isinstance(v, str) for v in parts.values()):
        raise RenderPoolError("a render process answered a malformed result")
    return Content(subject=parts["subject"], html=parts["html"], text=parts["text"])


def serve(conn: Connection, limits: Limits) -> None:
    """A child's life: render the jobs the parent sends, one at a time, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    signal.signal(signal.SIGXCPU, _out_of_cpu)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory if hard == resource.RLIM_INFINITY else min(memory, hard), hard))
    engine = TemplateEngine(limits.default_locale)
    try:
        conn.send_bytes(READY)
        while True:
            reply, stop = _answer(engine, conn.recv_bytes(), limits)
            conn.send_bytes(reply)
            if stop:
                return
    except (EOFError, OSError):
        return  # the pool closed, or the parent is gone


def child_main() -> None:
    """`python -c "from mailqueue.render_pool import child_main; child_main()" <socket fd> <limits>`."""
    serve(Connection(int(sys.argv[1])), Limits(**json.loads(sys.argv[2])))


# --- the parent ----------------------------------------------------------------------------------


class _Lost(Exception):
    """The child's socket broke: it died."""


def _child_environment() -> dict[str, str]:
    """What a child needs to find the code, and nothing else: no MAILQUEUE_* setting, no secret."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TZ") if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(path or os.getcwd() for path in sys.path)
    return env


class _Child:
    """One render process and the parent's end of its socket, watched by the event loop for as
    long as the child lives (so a child that dies while idle is noticed too)."""

    def __init__(self, limits: Limits) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from mailqueue.render_pool import child_main; child_main()",
                 str(theirs.fileno()), json.dumps(asdict(limits))],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_child_environment(),
            )
        self.conn = Connection(ours.detach())
        self.dead = False
        self._reply: asyncio.Future[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def started(self) -> _Child:
        """Once the child has imported what it needs and set its limits (it says READY)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)
        ready = await self.ask(None, START_SECONDS)
        if ready != READY:
            raise RuntimeError(f"a render process said {ready[:40]!r} instead of {READY!r}")
        return self

    def _readable(self) -> None:
        try:
            # The child writes a reply at once: once its first bytes are here, the rest follows.
            raw = self.conn.recv_bytes()
        except (EOFError, OSError):
            self._died()
            return
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(raw)

    def _died(self) -> None:
        self.dead = True
        self.unwatch()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(_Lost())

    async def ask(self, payload: bytes | None, timeout: float) -> bytes:
        """Send a job (None: just wait) and await the reply without blocking the event loop.
        TimeoutError after `timeout` seconds; _Lost if the child dies."""
        assert self._loop is not None
        self._reply = reply = self._loop.create_future()
        if self.dead:
            raise _Lost
        if payload is not None:
            try:
                self.conn.send_bytes(payload)  # the child waits in recv_bytes, so this does not block for long
            except OSError:
                self._died()
        try:
            async with asyncio.timeout(timeout):
                return await reply
        finally:
            self._reply = None

    def unwatch(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.conn.fileno())
            self._loop = None

    def stop(self, *, kill: bool) -> None:
        """End the child (blocking briefly: run it in a thread, after `unwatch`). Closing the socket asks it to exit."""
        self.conn.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RenderPool:
    """`settings.render_processes` children rendering templates; renders beyond that wait their turn.

    Start it before use and close it after (`async with`, or start/close): the API's lifespan
    and the worker do. A child that breaks a limit is replaced; the render fails with a
    TemplateLimitError naming the limit.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._idle: asyncio.Queue[_Child] | None = None
        self._children: set[_Child] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderPool:
        return cls(Limits.from_settings(settings))

    async def __aenter__(self) -> RenderPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._idle = asyncio.Queue()
        children = [_Child(self.limits) for _ in range(self.limits.processes)]
        self._children.update(children)
        for child in await asyncio.gather(*(c.started() for c in children)):
            self._idle.put_nowait(child)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        children, self._children = list(self._children), set()
        for child in children:
            child.unwatch()
        await asyncio.gather(*(asyncio.to_thread(child.stop, kill=False) for child in children))

    async def render(self, job: RenderJob) -> Content:
        """Render `job` in a child. Raises TemplateError (TemplateLimitError for a broken limit,
        MissingVariables when the job explains) like `TemplateEngine.run`."""
        if self._idle is None or self._closed:
            raise RenderPoolError("the render pool is not running")
        try:
            payload = pickle.dumps(job, pickle.HIGHEST_PROTOCOL)
        except RecursionError:  # JSON is read up to ~1,000 levels deep; pickle writes about half that
            raise TemplateLimitError("the template data is nested too deeply to render", "data") from None
        child = await self._ready_child()
        keep = False
        try:
            raw = await child.ask(payload, self.limits.timeout_seconds)
            try:
                answer = json.loads(raw)
                kind = answer["kind"]
            except (ValueError, TypeError, KeyError):
                raise RenderPoolError("a render process answered something that is not a render result") from None
            keep = kind in ("ok", "refused", "failed")
        except TimeoutError:
            raise self.limits.time_breach() from None
        except _Lost:
            raise self.limits.death() from None
        finally:
            # Also on cancellation (the caller gave up): a child still rendering cannot take the next job.
            if keep:
                self._idle.put_nowait(child)
            else:
                self._replace(child)
        if kind == "ok":
            return _content(answer)
        if kind in ("refused", "stopped"):
            raise _read_error(answer.get("error"))
        raise RenderPoolError(f"a render process failed: {str(answer.get('error'))[:500]}")

    async def _ready_child(self) -> _Child:
        assert self._idle is not None
        while True:
            child = await self._idle.get()
            if not child.dead:
                return child
            log.warning("render process %s died while idle (exit code %s); starting another", child.process.pid, child.process.poll())
            self._replace(child)

    def _replace(self, child: _Child) -> None:
        """Kill `child` and start another in the background (the caller's error need not wait for it)."""
        self._children.discard(child)
        child.unwatch()
        task = asyncio.get_running_loop().create_task(self._respawn(child))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _respawn(self, old: _Child) -> None:
        await asyncio.to_thread(old.stop, kill=True)
        while not self._closed:
            child = _Child(self.limits)
            self._children.add(child)
            try:
                await child.started()
            except Exception as exc:  # noqa: BLE001 - logged; renders wait for a child meanwhile
                log.warning("could not start a render process (%s: %s); trying again", type(exc).__name__, exc)
                self._children.discard(child)
                child.unwatch()
                await asyncio.to_thread(child.stop, kill=True)
                await asyncio.sleep(1)
                continue
            if not self._closed:
                assert self._idle is not None
                self._idle.put_nowait(child)
            return
