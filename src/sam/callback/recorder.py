"""One writer thread that commits callbacks in batches to SAM's database or to the spool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError

from .domain import Callback, DatabaseState, Outcome, ResultCode, SpoolKind
from .repository import Failure, Repository, classify_error, describe_error
from .spool import NewEntry, RefusedEntry, Reschedule, Spool, SpoolEntry, SpoolError

log = logging.getLogger("sam.callback.recorder")

QUEUED = SpoolKind.QUEUED
PENDING = SpoolKind.PENDING_MATCH

_MAX_BATCH = 256
# How long the writer waits for more callbacks when its batch is much smaller than the last one.
_GATHER_SECONDS = 0.001
_DRAIN_BATCH = 500
_IDLE_CHECK = 1.0
# With nothing to write, the database is still looked at this often: an outage (and the alert
# it raises) is noticed without waiting for a callback to fail on it.
HEARTBEAT_SECONDS = 15.0
_MAX_DB_BACKOFF = 10.0
# A callback the database refused for good (SPEC 8) is tried again this rarely on its own;
# `sam-callback spool retry` makes it due at once after the fix.
REFUSED_RETRY_SECONDS = 3600.0

# How long a request waits for the writer before keeping the callback in the spool itself
# (CALLBACK_DATABASE_TIMEOUT_SECONDS). Above the database's own limits (lock_timeout 5 s,
# statement_timeout 15 s): it only fires when the database accepts connections but never answers
# (a frozen server, a network black hole), where the writer thread stays blocked and, without
# it, no callback would get an answer.
DEFAULT_DATABASE_TIMEOUT_SECONDS = 20.0


def pending_delay(age: float) -> float:
    """Seconds until an unmatched callback is tried again, by how long it has waited (SPEC 4.3)."""
    if age < 60:
        return 2.0
    if age < 600:
        return 5.0
    return min(300.0, age / 10)


def retry_delay(attempts: int) -> float:
    """Exponential backoff for callbacks the database refused, capped at one minute."""
    return float(min(60.0, 0.5 * 2 ** min(attempts, 10)))


@dataclass(slots=True)
class _Item:
    callback: Callback
    request_id: str
    # None from the watchdog: the writer did not answer in time and the request takes over.
    future: asyncio.Future[ResultCode | None]
    deadline: float
    # Wall-clock arrival: a callback the request spools itself still ends its run at its arrival.
    arrived: float = 0.0
    result: ResultCode = field(default=ResultCode.UNAVAILABLE)
    taken_over: bool = False


@dataclass(slots=True)
class RecorderEvents:
    """Hooks for metrics and alerts, called from the writer thread; each must return at once.

    - `on_db_error(where)`: a statement failed ("callback", "spool" or "probe").
    - `on_applied(result)`: a spooled callback was applied (updated or already_processed).
    - `on_refused(deployment_id, status, error)`: the database refused a callback for a reason
      retrying cannot fix (SPEC 8); it stays in the spool marked refused. `error` holds no secret.
    - `on_unmatched(entry)`: a callback's row never appeared within the match window.
    - `on_database_down(error)`: a try to reach the database failed; `on_database_up()`: it
      answers again after failing.
    """

    on_db_error: Callable[[str], None] = lambda _where: None
    on_applied: Callable[[ResultCode], None] = lambda _result: None
    on_refused: Callable[[str, str, str], None] = lambda _deployment_id, _status, _error: None
    on_unmatched: Callable[[SpoolEntry], None] = lambda _entry: None
    on_database_down: Callable[[str | None], None] = lambda _error: None
    on_database_up: Callable[[], None] = lambda: None


class Recorder:
    """Owns every write: request callbacks in batches, then the spool's drain, one at a time."""

    def __init__(
        self,
        repository: Repository,
        spool: Spool,
        *,
        match_window: float,
        events: RecorderEvents | None = None,
        database_timeout: float = DEFAULT_DATABASE_TIMEOUT_SECONDS,
    ) -> None:
        self.repository = repository
        self.database_timeout = database_timeout
        self.spool = spool
        self.match_window = match_window
        self.events = events or RecorderEvents()
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db_retry_at = 0.0
        self._db_backoff = 0.0
        self._db_state_since = time.time()
        self._next_drain = 0.0
        self.heartbeat_seconds = HEARTBEAT_SECONDS
        self._next_heartbeat = 0.0
        self.last_db_error: str | None = None
        # Requests waiting for the writer, oldest first; only the event loop's thread touches it.
        self._waiting: deque[_Item] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._gather_target = 0
        # True from the moment requests had to take their callbacks back from the writer until it
        # answers a batch again: meanwhile new callbacks go straight to the spool, instead of
        # each waiting `database_timeout` seconds behind a writer stuck in the database.
        self._writer_stuck = False
        self._next_recovery_probe = 0.0
        # Requests keep their callbacks in the spool one at a time, in arrival order (event loop only).
        self._spool_turn: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        # Requests spooling their callbacks right now (event loop only): while any is, a new
        # callback goes the same way, or it could reach the database before an earlier one of
        # its run that the spool does not hold yet.
        self._spooling = 0

    @property
    def database_available(self) -> bool:
        """False while the writer believes the database is out of reach, or is stuck in it."""
        return self._db_backoff == 0.0 and not self._writer_stuck

    @property
    def database_state(self) -> DatabaseState:
        """`database_available`, with the time the writer first saw it so."""
        return DatabaseState(self.database_available, self._db_state_since)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="sam-callback-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what was submitted, then stop the thread and give up the drain lease."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        with contextlib.suppress(SpoolError):
            self.spool.release_lease()

    def wake_database(self) -> None:
        """Someone saw the database answer: let the writer use it again at once."""
        self._db_retry_at = 0.0
        self._next_drain = 0.0
        self._next_recovery_probe = 0.0

    async def submit(self, callback: Callback, request_id: str) -> ResultCode:
        """Record one callback durably; return the envelope code once it is committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ResultCode | None] = loop.create_future()
        item = _Item(callback, request_id, future, loop.time() + self.database_timeout, time.time())
        if self._writer_stuck or self._spooling:
            return await self._spool_in_turn(item, waited=False)
        # One watchdog for all requests instead of a timeout per request: arming and cancelling
        # a timer for every callback cost more than the rest of this method.
        self._waiting.append(item)
        if self._watchdog is None:
            self._watchdog = loop.call_at(item.deadline, self._take_over_late)
        self._queue.put(item)
        result = await future
        if result is not None:
            return result
        # The writer is stuck in the database. Keep the callback in the spool from here; if the
        # writer still commits it later, the spooled copy is a no-op (the UPDATE is guarded).
        return await self._spool_in_turn(item, waited=True)

    async def _spool_in_turn(self, item: _Item, *, waited: bool) -> ResultCode:
        # One at a time, in the order the requests got here (asyncio.Lock is first come, first
        # served): two callbacks of one run must not be spooled in the wrong order by two threads.
        loop = asyncio.get_running_loop()
        if self._spool_turn is None or self._spool_turn[0] is not loop:
            self._spool_turn = (loop, asyncio.Lock())
        self._spooling += 1
        try:
            async with self._spool_turn[1]:
                return await anyio.to_thread.run_sync(self._spool_stuck, item, waited)
        finally:
            self._spooling -= 1

    def _take_over_late(self) -> None:
        """Hand back to their requests the callbacks the writer has not answered in time."""
        self._watchdog = None
        waiting = self._waiting
        now = waiting[0].future.get_loop().time() if waiting else 0.0
        late = False
        while waiting and (waiting[0].future.done() or waiting[0].deadline <= now):
            late = self._take_over(waiting.popleft()) or late
        if late:
            # Everything queued behind a stuck writer waits for it: taken back now, in arrival
            # order, so that none is spooled after a later callback of the same run.
            while waiting:
                self._take_over(waiting.popleft())
            if not self._writer_stuck:
                self._writer_stuck = True
                self._db_state_since = time.time()
                log.warning(
                    "La base de datos no responde en %.0f s: los callbacks van al spool hasta que responda",
                    self.database_timeout,
                )
                self.events.on_database_down(f"sin respuesta en {self.database_timeout:.0f} s")
        if waiting:
            self._watchdog = waiting[0].future.get_loop().call_at(waiting[0].deadline, self._take_over_late)

    @staticmethod
    def _take_over(item: _Item) -> bool:
        if item.future.done():
            return False
        item.taken_over = True
        item.future.set_result(None)
        return True

    def _answered(self, batch: list[_Item]) -> None:
        _set_results(batch)
        # Answers come in about the order of submission: forget the answered ones at the front.
        waiting = self._waiting
        while waiting and waiting[0].future.done():
            waiting.popleft()

    def _spool_stuck(self, item: _Item, waited: bool) -> ResultCode:
        try:
            # Kept with its arrival time, not this moment: the database's FechaFin is computed from
            # it (SPEC 4 step 1), and the wait for a stuck database is part of the outage.
            self.spool.add([NewEntry(item.callback, item.request_id, QUEUED)], now=item.arrived, first_delay=0.0)
        except SpoolError as exc:
            log.error("No se pudo guardar en el spool un callback con la base de datos bloqueada: %s", exc)
            return ResultCode.UNAVAILABLE
        if waited:
            log.warning(
                "La base de datos no responde en %.0f s; callback guardado en el spool deploymentId=%s request_id=%s",
                self.database_timeout, item.callback.deployment_id, item.request_id,
            )  # fmt: skip
        else:
            log.warning(
                "La base de datos sigue sin responder; callback guardado en el spool sin esperar deploymentId=%s "
                "request_id=%s",
                item.callback.deployment_id, item.request_id,
            )  # fmt: skip
        return ResultCode.QUEUED

    def _run(self) -> None:
        while True:
            wait = max(0.0, min(_IDLE_CHECK, self._next_drain - time.time()))
            try:
                first = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                first = None
                stopping = False
            else:
                stopping = first is None
            batch: list[_Item] = [] if first is None else [first]
            stopping = self._take_queued(batch) or stopping
            if batch and not stopping and len(batch) < self._gather_target:
                # Group commit: the last batch says more callbacks are on their way; a moment's
                # wait turns a string of tiny commits (each with its fsync) into one.
                time.sleep(_GATHER_SECONDS)
                stopping = self._take_queued(batch)
            self._gather_target = len(batch) // 2
            # Callbacks that waited too long were already spooled by their request.
            batch = [item for item in batch if not item.taken_over]
            if batch:
                self._record_safely(batch)
            if stopping:
                return
            if time.time() >= self._next_drain:
                try:
                    self._drain_step()
                except Exception:
                    log.exception("Error inesperado al vaciar el spool; se reintentará")
                    self._next_drain = time.time() + _IDLE_CHECK

    def _take_queued(self, batch: list[_Item]) -> bool:
        """Move what is queued into `batch`, up to the batch size; True when asked to stop."""
        while len(batch) < _MAX_BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _record_safely(self, batch: list[_Item]) -> None:
        try:
            self._record(batch)
        except Exception:
            log.exception("Error inesperado al registrar %d callbacks", len(batch))
        finally:
            self._resolve(batch)

    def _resolve(self, batch: list[_Item]) -> None:
        loop = batch[0].future.get_loop()
        # A closed loop means nobody is waiting for these answers any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._answered, batch)

    # --- hot path -------------------------------------------------------------------------

    def _record(self, batch: list[_Item]) -> None:
        now = time.time()
        try:
            waiting = self.spool.waiting_kinds(item.callback.deployment_id for item in batch)
        except SpoolError:
            waiting = {}
        to_spool: list[tuple[_Item, SpoolKind]] = []
        direct: list[_Item] = []
        for item in batch:
            # Callbacks for a run that already waits in the spool queue up behind it, so each
            # run's callbacks are applied in arrival order.
            kind = waiting.get(item.callback.deployment_id)
            if kind is None:
                direct.append(item)
            else:
                to_spool.append((item, kind))
        if direct and time.monotonic() < self._db_retry_at:
            to_spool += [(item, QUEUED) for item in direct]
        elif direct:
            # Sorted by deploymentId (stable, so one run keeps its order): every process locks
            # rows in the same order, and two writers never deadlock on each other.
            ordered = sorted(direct, key=lambda item: item.callback.deployment_id)
            try:
                outcomes = self.repository.apply_many([item.callback for item in ordered])
            except SQLAlchemyError as exc:
                if classify_error(exc) is Failure.DISCONNECT:
                    self._database_failed(exc, where="callback")
                    to_spool += [(item, QUEUED) for item in ordered]
                else:
                    # The database answered but refused a statement: one bad row (a lock, a
                    # value too long) must not send every other callback of the batch away.
                    to_spool += self._isolate(ordered, exc, now)
            else:
                self._database_answered()
                to_spool += self._settle(ordered, outcomes)
        if to_spool:
            try:
                self.spool.add(
                    (NewEntry(item.callback, item.request_id, kind) for item, kind in to_spool),
                    now=now,
                    first_delay=pending_delay(0),
                )
            except SpoolError as exc:
                log.error("No se pudo guardar en el spool %d callbacks: %s", len(to_spool), exc)
                for item, _kind in to_spool:
                    item.result = ResultCode.UNAVAILABLE
            else:
                for item, kind in to_spool:
                    item.result = kind.code
                self._next_drain = min(self._next_drain, now + pending_delay(0))

    @staticmethod
    def _settle(items: list[_Item], outcomes: list[Outcome]) -> list[tuple[_Item, SpoolKind]]:
        """Set the answers the database gave; return the callbacks whose row is still missing."""
        missing: list[tuple[_Item, SpoolKind]] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is Outcome.NOT_FOUND:
                missing.append((item, PENDING))
            else:
                item.result = outcome.value
        return missing

    def _isolate(self, ordered: list[_Item], first: SQLAlchemyError, now: float) -> list[tuple[_Item, SpoolKind]]:
        """Apply a refused batch one callback at a time; return what goes to the spool (queued or pending)."""
        to_spool: list[tuple[_Item, SpoolKind]] = []
        refused: list[tuple[_Item, str]] = []
        held: set[str] = set()  # runs with a callback kept back: their later ones wait behind it
        for index, item in enumerate(ordered):
            deployment_id = item.callback.deployment_id
            if deployment_id in held:
                to_spool.append((item, QUEUED))
                continue
            exc: SQLAlchemyError | None = first if len(ordered) == 1 else None
            if exc is None:
                try:
                    outcomes = self.repository.apply_many([item.callback])
                except SQLAlchemyError as error:
                    exc = error
                else:
                    missing = self._settle([item], outcomes)
                    to_spool += missing
                    held.update(i.callback.deployment_id for i, _ in missing)
                    continue
            failure = classify_error(exc)
            if failure is Failure.DISCONNECT:
                self._database_failed(exc, where="callback")
                to_spool += [(rest, QUEUED) for rest in ordered[index:]]
                break
            held.add(deployment_id)
            self.events.on_db_error("callback")
            if failure is Failure.PERMANENT:
                refused.append((item, describe_error(exc)))
            else:
                log.warning(
                    "Error transitorio al registrar deploymentId=%s (%s); callback guardado en el spool request_id=%s",
                    deployment_id, describe_error(exc), item.request_id,
                )  # fmt: skip
                to_spool.append((item, QUEUED))
        if refused:
            self._keep_refused(refused, now)
        return to_spool

    def _keep_refused(self, refused: list[tuple[_Item, str]], now: float) -> None:
        try:
            self.spool.add_refused(
                (RefusedEntry(item.callback, item.request_id, error) for item, error in refused),
                now=now,
                retry_at=now + REFUSED_RETRY_SECONDS,
            )
        except SpoolError as exc:
            log.error("No se pudo guardar en el spool %d callbacks rechazados: %s", len(refused), exc)
            for item, _error in refused:
                item.result = ResultCode.UNAVAILABLE
            return
        for item, error in refused:
            item.result = ResultCode.QUEUED
            self._refused(item.callback.deployment_id, item.callback.status, error, item.request_id)

    def _refused(self, deployment_id: str, status: str, error: str, request_id: str) -> None:
        log.error(
            "La base de datos rechaza el callback de forma permanente (%s): queda en el spool como rechazado "
            "deploymentId=%s request_id=%s. Ejecute `sam-callback check`, corrija la tabla y después "
            "`sam-callback spool retry`",
            error, deployment_id, request_id,
        )  # fmt: skip
        self.events.on_refused(deployment_id, status, error)

    def _database_failed(self, exc: BaseException, *, where: str) -> None:
        self.last_db_error = describe_error(exc)
        if not self._db_backoff:
            self._db_state_since = time.time()
        self._db_backoff = min(_MAX_DB_BACKOFF, max(0.5, self._db_backoff * 2))
        self._db_retry_at = time.monotonic() + self._db_backoff
        self._next_drain = min(self._next_drain, time.time() + self._db_backoff)
        self.events.on_db_error(where)
        self.events.on_database_down(self.last_db_error)
        log.warning(
            "Base de datos no disponible (%s); los callbacks van al spool. Reintento en %.1f s",
            self.last_db_error,
            self._db_backoff,
        )

    def _database_answered(self) -> None:
        self._next_heartbeat = time.monotonic() + self.heartbeat_seconds
        if self._writer_stuck:
            # The writer got an answer again (a batch, the spool, its heartbeat): callbacks go to it.
            self._writer_stuck = False
            self._db_state_since = time.time()
            log.info("La base de datos vuelve a responder al escritor; los callbacks vuelven a ir a ella")
            self.events.on_database_up()
            self._next_drain = 0.0  # what the requests kept meanwhile goes to the database now
        if self._db_backoff:
            self._db_state_since = time.time()
            log.info("La base de datos responde de nuevo; se vacía el spool")
            self.events.on_database_up()
            # Backoff may have pushed queued callbacks up to a minute away; the outage is over.
            with contextlib.suppress(SpoolError):
                self.spool.queued_due_now(now=time.time())
            self._next_drain = 0.0
        self._db_backoff = 0.0
        self._db_retry_at = 0.0
        self.last_db_error = None

    # --- spool drain ----------------------------------------------------------------------

    def _drain_step(self) -> None:
        now = time.time()
        self._next_drain = now + _IDLE_CHECK
        backing_off = self._db_retry_at - time.monotonic()
        if backing_off > 0:
            self._next_drain = now + backing_off
            return
        if (self._writer_stuck or self._db_backoff) and time.monotonic() >= self._next_recovery_probe:
            # Asked directly: while stuck no callback reaches the writer, and with entries due
            # that this process cannot drain (another holds the lease, a chain's head is not
            # due) nothing else would ever try the database again.
            self._next_recovery_probe = time.monotonic() + _IDLE_CHECK
            self._probe_database()
            if self._writer_stuck or self._db_backoff:
                return
        try:
            due = self.spool.next_due()
        except SpoolError:
            return
        if due is None or due > now:
            if due is not None:
                self._next_drain = min(self._next_drain, due)
            if self._db_backoff or time.monotonic() >= self._next_heartbeat:
                self._probe_database()
            return
        if not self.spool.claim_lease():
            return
        entries = self.spool.due_chains(now=now, limit=_DRAIN_BATCH)
        if entries:
            self._apply_entries(entries, now)
            self._next_drain = time.time()  # more may be due: go again after the next batch

    def _probe_database(self) -> None:
        self._next_heartbeat = time.monotonic() + self.heartbeat_seconds
        try:
            self.repository.ping()
        except SQLAlchemyError as exc:
            self._database_failed(exc, where="probe")
        else:
            self._database_answered()

    def _apply_entries(self, entries: list[SpoolEntry], now: float) -> None:
        # One try per run per step: the chain stops at the first callback whose row is missing.
        chains = [
            list(chain)
            for _, chain in groupby(
                sorted(entries, key=lambda e: (e.deployment_id, e.seq)),
                key=lambda e: e.deployment_id,
            )
        ]
        failed: list[tuple[list[SpoolEntry], SQLAlchemyError]] = []
        try:
            applied, missing = self._apply_chains(chains)
        except SQLAlchemyError as exc:
            if len(chains) == 1 or classify_error(exc) is Failure.DISCONNECT:
                applied, missing, failed = [], [], [(chain, exc) for chain in chains]
            else:
                # The database answers but one run's row refuses (a lock held past
                # lock_timeout, a serialization failure, a trigger, a value too long): try each
                # run on its own so that one bad row does not hold every other one back.
                applied, missing, failed = self._apply_each(chains)
        if failed:
            self._reschedule_failed(failed, now)
            if not applied and not missing:
                first_error = failed[0][1]
                if classify_error(first_error) is Failure.DISCONNECT:
                    self._database_failed(first_error, where="spool")
                    return
                # The database answered: keeping the circuit shut lets each failing run back
                # off on its own schedule instead of being made due again whenever it closes.
                self.events.on_db_error("spool")
                log.warning(
                    "Error al aplicar %d callbacks del spool (%s); se reintentarán",
                    len(failed), describe_error(first_error),
                )  # fmt: skip
                return
        self._database_answered()
        self.spool.complete(entry.seq for entry, _ in applied)
        for entry, result in applied:
            self.events.on_applied(result)
            log.info(
                "Callback del spool aplicado deploymentId=%s estado=%s resultado=%s request_id=%s espera_s=%.1f",
                entry.deployment_id, entry.status, result, entry.request_id, now - entry.received_at,
            )  # fmt: skip
        updates = []
        expired_entries = []
        for entry in missing:
            age = now - entry.window_start
            expired = age >= self.match_window
            if expired:
                expired_entries.append(entry)
                log.warning(
                    "Callback sin ejecución tras la ventana de espera: deploymentId=%s request_id=%s queda como no emparejado",
                    entry.deployment_id,
                    entry.request_id,
                )
            updates.append(Reschedule(entry.seq, now + pending_delay(age), PENDING, None, expired))
        if updates:
            self.spool.reschedule(updates)
        for entry in expired_entries:
            self.events.on_unmatched(entry)

    def _reschedule_failed(self, failed: list[tuple[list[SpoolEntry], SQLAlchemyError]], now: float) -> None:
        """Back off each failed run; one refused for good waits for `spool retry` (or an hour)."""
        transient = []
        refused = []
        for chain, exc in failed:
            head, error = chain[0], describe_error(exc)
            if classify_error(exc) is Failure.PERMANENT:
                refused.append(Reschedule(head.seq, now + REFUSED_RETRY_SECONDS, head.kind, error))
                self._refused(head.deployment_id, head.status, error, head.request_id)
            else:
                transient.append(Reschedule(head.seq, now + retry_delay(head.attempts), head.kind, error))
        if transient:
            self.spool.reschedule(transient)
        if refused:
            self.spool.reschedule(refused, refused=True)

    def _apply_each(
        self, chains: list[list[SpoolEntry]]
    ) -> tuple[list[tuple[SpoolEntry, ResultCode]], list[SpoolEntry], list[tuple[list[SpoolEntry], SQLAlchemyError]]]:
        applied: list[tuple[SpoolEntry, ResultCode]] = []
        missing: list[SpoolEntry] = []
        failed: list[tuple[list[SpoolEntry], SQLAlchemyError]] = []
        for index, chain in enumerate(chains):
            try:
                chain_applied, chain_missing = self._apply_chains([chain])
            except SQLAlchemyError as exc:
                failed.append((chain, exc))
                if classify_error(exc) is Failure.DISCONNECT:
                    failed += [(rest, exc) for rest in chains[index + 1 :]]
                    break
            else:
                applied += chain_applied
                missing += chain_missing
        return applied, missing, failed

    def _apply_chains(
        self, chains: list[list[SpoolEntry]]
    ) -> tuple[list[tuple[SpoolEntry, ResultCode]], list[SpoolEntry]]:
        entries = [entry for chain in chains for entry in chain]
        # Each run ends when its callback arrived, not now: the wait is subtracted from the
        # database's clock in the statement itself.
        wall = time.time()
        outcomes = self.repository.apply_many(
            [entry.callback for entry in entries], waited=[wall - entry.received_at for entry in entries]
        )
        applied: list[tuple[SpoolEntry, ResultCode]] = []
        missing: list[SpoolEntry] = []
        stopped: set[str] = set()
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.deployment_id in stopped:
                continue
            if outcome is Outcome.NOT_FOUND:
                missing.append(entry)
                stopped.add(entry.deployment_id)
            else:
                applied.append((entry, outcome.value))
        return applied, missing


def _set_results(batch: list[_Item]) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_result(item.result)
