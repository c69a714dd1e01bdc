"""What ``hms_mgmt.init`` returns: define workflows, attach handlers, start and watch runs.

Nothing connects until first used. A management object is a client (start,
status, wait, cancel, retry, signal), a step service (``run`` serves its
handlers) or both. Given a ``store_url`` it also hosts an engine in-process,
which is how the one-process demo on the ``memory://`` bus works; otherwise
the engine is the separate ``python -m hms_mgmt.engine`` daemon.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

from bus_adapters import open_bus
from bus_adapters.base import Bus
from hms_mgmt.client import Calls, Client
from hms_mgmt.context import Handler
from hms_mgmt.definitions import Parallel, RetryPolicy, Step, WorkflowDefinition, split_topic
from hms_mgmt.errors import DefinitionError, HmsError
from hms_mgmt.faults import Faults
from hms_mgmt.logs import get_logger
from hms_mgmt.loopwatch import LoopMonitor
from hms_mgmt.settings import Settings
from hms_mgmt.wire.outcomes import Outcome
from hms_mgmt.wire.steps import StepMessage

log = get_logger("management")

H = TypeVar("H", bound=Handler)


class Management(Calls):
    def __init__(
        self,
        service_name: str,
        broker_url: str,
        store_url: str | None = None,
        *,
        concurrency: int = 100,
        request_timeout: float = 30.0,
    ) -> None:
        self.service_name = service_name
        self.broker_url = broker_url
        self.store_url = store_url
        self.concurrency = concurrency
        self.request_timeout = request_timeout
        self.definitions: dict[str, WorkflowDefinition] = {}
        self.handlers: dict[str, Handler] = {}
        self._bus: Bus | None = None
        self._client: Client | None = None
        self.faults = (
            Faults()
        )  # the chaos suite's: python -m hms_mgmt.worker sets them from HMS_TEST_*
        self._hosted: Any = None  # a hms_mgmt.hosted.HostedEngine, given a store_url
        self._worker: Any = None  # a hms_mgmt.worker.Worker while serving
        self._threads: Any = None  # its HandlerThreads (kept after it stops, for metrics)
        # Watches the event loop while run() serves; run() makes one from HMS_* if None.
        self.loop_monitor: LoopMonitor | None = None
        self._define_tasks: set[asyncio.Task[None]] = set()
        self._lock: asyncio.Lock | None = None
        # Called with each step run's outcome in this process (a step service's metrics).
        self.on_outcome: Callable[[StepMessage, Outcome], None] | None = None

    def __repr__(self) -> str:
        return f"<Management {self.service_name!r} workflows={sorted(self.definitions)}>"

    # -- defining -------------------------------------------------------------

    def define_workflow(
        self,
        name: str,
        steps: Sequence[str | Step | Parallel],
        *,
        retry: RetryPolicy | None = None,
        on_error: str | Step | None = None,
    ) -> WorkflowDefinition:
        """Name a workflow and its ordered steps; a mistake is an error here and now."""
        definition = WorkflowDefinition.build(name, steps, retry=retry, on_error=on_error)
        self.definitions[name] = definition
        for topic in self.handlers:
            self._check_topic(topic)
        if self._client is not None:
            self._send_definition(definition)
        return definition

    @overload
    def on_step(self, topic: str) -> Callable[[H], H]: ...

    @overload
    def on_step(self, topic: str, handler: H) -> H: ...

    def on_step(self, topic: str, handler: H | None = None) -> H | Callable[[H], H]:
        """Attach a handler to ``"workflow.step"``; use as a call or as a decorator."""
        self._check_topic(topic)

        def register(fn: H) -> H:
            if not callable(fn):
                raise DefinitionError(f"handler for {topic!r} is not callable: {fn!r}")
            if topic in self.handlers and self.handlers[topic] is not fn:
                raise DefinitionError(f"{topic!r} already has a handler")
            self.handlers[topic] = fn
            return fn

        return register if handler is None else register(handler)

    def _check_topic(self, topic: str) -> None:
        workflow, step = split_topic(topic)
        definition = self.definitions.get(workflow)
        if definition is not None and definition.step(step) is None:
            raise DefinitionError(
                f"{topic!r}: workflow {workflow!r} has no step {step!r} "
                f"(steps: {', '.join(definition.step_names)})"
            )

    # -- connecting -----------------------------------------------------------

    async def _connect(self) -> Client:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is not None:
                return self._client
            if self.store_url is not None:
                from hms_mgmt.hosted import HostedEngine

                self._hosted = await HostedEngine.start(
                    self.broker_url, self.store_url, name=self.service_name
                )
            self._bus = open_bus(self.broker_url, name=self.service_name)
            client = Client(
                self._bus, service_name=self.service_name, request_timeout=self.request_timeout
            )
            try:
                await client.connect()
            except BaseException:
                await client.close()
                self._bus = None
                raise
            self._client = client
            for definition in self.definitions.values():
                self._send_definition(definition)
            return client

    def _send_definition(self, definition: WorkflowDefinition) -> None:
        """Send a definition to the engine; the request waits in its queue if it is down."""
        assert self._client is not None
        client = self._client

        async def send() -> None:
            try:
                result = await client.define(definition)
                log.debug("definition registered", workflow=definition.name, **result)
            except HmsError as exc:
                log.error(
                    "the engine refused a definition", workflow=definition.name, error=str(exc)
                )

        task = asyncio.get_running_loop().create_task(send())
        self._define_tasks.add(task)
        task.add_done_callback(self._define_tasks.discard)

    # -- client calls (the verbs are Calls') -------------------------------------

    async def request(self, kind: str, fields: dict[str, Any], **options: Any) -> Any:
        """Every call (start, status, wait, ...) goes through the client, connected on first use."""
        return await (await self._connect()).request(kind, fields, **options)

    # -- serving --------------------------------------------------------------

    async def run(self) -> None:
        """Serve the registered handlers until cancelled or SIGTERM/SIGINT.

        While it serves, :attr:`loop_monitor` watches the event loop and logs any stall
        over ``HMS_LOOP_BLOCK_THRESHOLD`` (a handler blocking it, say).
        """
        if self.loop_monitor is None:
            self.loop_monitor = LoopMonitor.from_settings(Settings.from_env(), "step-service")
        self.loop_monitor.start()
        try:
            await self.serve()
            stop = asyncio.Event()
            signals = _catch_signals(stop.set)
            try:
                await stop.wait()  # until cancelled or signalled
            finally:
                _release_signals(signals)
                await self.close()  # stops taking work, lets running handlers finish
        finally:
            self.loop_monitor.stop()

    async def serve(self) -> None:
        """Start serving the handlers in the background (tests and one-process programs)."""
        from hms_mgmt.worker import Worker

        if not self.handlers:
            raise DefinitionError(f"{self.service_name!r} has no step handlers to serve")
        await self._connect()
        assert self._bus is not None
        self._worker = Worker(
            self._bus,
            self.handlers,
            self.definitions,
            concurrency=self.concurrency,
            on_outcome=self.on_outcome,
            faults=self.faults,
            step_queue_type=Settings.from_env().step_queue_type,
            ask=self._client.request if self._client is not None else None,
        )
        self._threads = self._worker.threads
        await self._worker.start()

    def readiness(self) -> dict[str, bool]:
        """Whether this step service is serving and connected (for ``/readyz``)."""
        return {
            "serving": self._worker is not None,
            "broker": self._bus is not None and self._bus.connected,
        }

    @property
    def reconnects(self) -> int:
        """Broker connections re-established after a drop (for metrics)."""
        return 0 if self._bus is None else self._bus.reconnects

    @property
    def abandoned_threads(self) -> int:
        """Handler threads given up on at their step's deadline (for metrics)."""
        return int(getattr(self._threads, "abandoned", 0))

    @property
    def threads_running_past_timeout(self) -> int:
        """Of those, the ones still running (for metrics)."""
        return int(getattr(self._threads, "running_past_timeout", 0))

    async def close(self) -> None:
        """Stop serving, stop a hosted engine, and disconnect."""
        if self._worker is not None:
            await self._worker.shutdown()
            self._worker = None
        for task in list(self._define_tasks):
            task.cancel()
        await asyncio.gather(*self._define_tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._hosted is not None:
            await self._hosted.stop()
            self._hosted = None

    async def __aenter__(self) -> Management:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _catch_signals(handler: Callable[[], None]) -> list[signal.Signals]:
    """SIGTERM and SIGINT call ``handler``, when this loop runs in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    caught = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, handler)
            caught.append(signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - platform dependent
            pass
    return caught


def _release_signals(signals: list[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.remove_signal_handler(signum)


def init(
    service_name: str,
    broker_url: str | None = None,
    store_url: str | None = None,
    *,
    concurrency: int = 100,
    request_timeout: float = 30.0,
) -> Management:
    """A management object; no I/O until first used.

    ``broker_url`` defaults to ``HMS_BROKER_URL``, else the local RabbitMQ.
    ``store_url`` makes this object host an engine in-process (the one-process
    demo); clients and step services leave it out.
    """
    settings = Settings.from_env()
    return Management(
        service_name,
        broker_url or settings.broker_url,
        store_url,
        concurrency=concurrency,
        request_timeout=request_timeout,
    )
