"""The server process: gRPC (Generation, health, reflection) + metrics around one engine.

Lifecycle: listen with health NOT_SERVING, load the model off the event loop, SERVING; on
SIGTERM / SIGINT: NOT_SERVING, refuse new calls, let in-flight ones drain, cancel the rest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import faults
from engine.engine import EngineConfig, LLMEngine
from engine.loop import EngineLoop
from engine.process import EngineProcess
from mistral_serve.v1 import generation_pb2_grpc as pb_grpc
from service.auth import ApiKeyInterceptor
from service.config import ServerConfig
from service.decode import DecodeErrorInterceptor
from service.metrics import ServiceMetrics
from service.servicer import SERVICE_NAME, GenerationServicer

log = logging.getLogger(__name__)


class Server:
    """gRPC + health + reflection + metrics around one engine; see serve()."""

    def __init__(self, config: ServerConfig, engine_config: EngineConfig):
        self.config = config
        self.engine_config = engine_config
        self.model_name = config.model_name or model_name_for(engine_config.model)
        self.engine_loop: Optional[EngineLoop | EngineProcess] = None
        self._process: Optional[EngineProcess] = None
        self.metrics = ServiceMetrics(self.model_name, self._stats)
        self.servicer = GenerationServicer(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.grpc_server: Optional[grpc.aio.Server] = None

    def _stats(self):
        return self.engine_loop.stats() if self.engine_loop is not None else None

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def request_stop(self) -> None:
        """First call: drain then stop. A second call skips what is left of the drain."""
        if self._stop.is_set():
            log.info("second stop signal: cancelling in-flight calls now")
            self._force.set()
        self._stop.set()

    async def start(self) -> None:
        """Listen (NOT_SERVING) and start the metrics endpoint; the model is not loaded yet."""
        cfg = self.config
        api_key = cfg.resolved_api_key()
        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        # The API key check wraps the decode check: an unauthenticated call is UNAUTHENTICATED.
        interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
        interceptors.append(DecodeErrorInterceptor())
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_GenerationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self.grpc_server = server
        log.info("gRPC listening on %s (%s, auth %s); loading the model", address,
                 "TLS" if cfg.tls else "plaintext", "on" if api_key else "off")
        if cfg.metrics_port:
            self.metrics.start_http(cfg.host, cfg.metrics_port)

    async def load(self) -> bool:
        """Load the model off the event loop; False when a stop signal came first."""
        if self.engine_config.model is None:
            log.info("no --model given: serving the built-in demo model (random weights)")
        if faults.enabled_by_env():  # tests only: request ids with @fail- marks fail on purpose
            log.warning("%s=1: FAULT INJECTION IS ON (for tests; never in production)",
                        faults.ENV_VAR)
        if self.config.engine_process:
            process = EngineProcess(self.engine_config, self.config.max_waiting,
                                    self.config.log_level_number)
            self._process = process  # stopped by shutdown() even while it still loads
            loaded = await self._load(process.start)
            if loaded is None:
                return False
            (info, tokenizer), self.engine_loop = loaded, process
        else:
            engine = await self._load(LLMEngine.from_config, self.engine_config)
            if engine is None:
                return False
            if faults.enabled_by_env():
                engine.runner.fault_hook = faults.request_id_faults
            self.engine_loop = EngineLoop(engine, max_waiting=self.config.max_waiting)
            self.engine_loop.start()
            info, tokenizer = engine.info, engine.tokenizer
        self.servicer.attach(info, tokenizer, self.engine_loop)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s: %d KV blocks of %d tokens%s", self.model_name, info.num_kv_blocks,
                 info.config.block_size, " (engine process)" if self.config.engine_process else "")
        return True

    async def _load(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) on a daemon thread; None when a stop signal came first."""
        future = asyncio.get_running_loop().create_future()
        _in_daemon_thread(future, fn, *args)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([future, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not future.done():
            return None
        return future.result()  # raises the load error

    async def run_until_stopped(self) -> None:
        """Serve until request_stop(); watch the engine meanwhile."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            loop = self.engine_loop
            if loop is not None and loop.error is not None:
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def shutdown(self) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones drain_seconds, then cancel."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        n = self.servicer.num_calls
        if n:
            log.info("draining %d in-flight call(s) for up to %.0f s", n,
                     self.config.drain_seconds)
            idle = asyncio.ensure_future(self.servicer.wait_idle())
            force = asyncio.ensure_future(self._force.wait())
            await asyncio.wait([idle, force], timeout=self.config.drain_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
            force.cancel()
            if self.servicer.num_calls:
                log.warning("cancelling %d call(s) still running", self.servicer.num_calls)
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=None)  # cancels what is left; _call_done aborts
        if self.engine_loop is not None:
            await asyncio.to_thread(self.engine_loop.shutdown)
        elif self._process is not None:  # stopped while the child was loading
            await asyncio.to_thread(self._process.shutdown, 2.0)
        self.metrics.stop_http()
        log.info("stopped")


def _in_daemon_thread(future: asyncio.Future, fn: Callable, *args: Any) -> None:
    """Run fn(*args) on a daemon thread (a stop during a long load must not wait for it)."""
    loop = future.get_loop()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=target, name="model-load", daemon=True).start()


def model_name_for(model: Optional[str]) -> str:
    """The served model's name: the hub id as given, a directory's name, or the demo's."""
    if model is None:
        return "mistral-serve-demo"
    path = Path(model)
    return path.name if path.exists() else model


async def serve(config: ServerConfig, engine_config: EngineConfig) -> int:
    """Run a server until SIGTERM / SIGINT; returns the process exit code."""
    server = Server(config, engine_config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
        if await server.load():
            await server.run_until_stopped()
    except Exception as e:  # noqa: BLE001 - a failed start or load: say why and exit 1
        log.error("cannot serve: %s", e, exc_info=log.isEnabledFor(logging.DEBUG))
        await server.shutdown()
        return 1
    await server.shutdown()
    return 0
