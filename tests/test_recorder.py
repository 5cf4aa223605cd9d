"""The writer seen from the requests: answers in batches, and a late writer does not hold a request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sam.callback.domain import Callback, Outcome
from sam.callback.recorder import Recorder, RecorderEvents
from sam.callback.repository import Repository, make_engine
from sam.callback.spool import Spool
from tests.utils import fetch_run, insert_run, wait_for


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Repository, Spool, str]]:
    url = f"sqlite:///{(tmp_path / 'sam.db').as_posix()}"
    repository = Repository(make_engine(url), ["RUN_COMPLETED"])
    repository.create_schema()
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    yield repository, spool, url
    spool.close()
    repository.dispose()


def _callback(deployment_id: str) -> Callback:
    return Callback(deployment_id=deployment_id, status="RUN_COMPLETED", raw="{}")


def test_answers_leave_nothing_behind(parts: tuple[Repository, Spool, str]) -> None:
    repository, spool, url = parts
    for n in range(200):
        insert_run(url, f"r-{n}")
    recorder = Recorder(repository, spool, match_window=60)
    recorder.start()

    async def burst() -> list[str]:
        return await asyncio.gather(*(recorder.submit(_callback(f"r-{n}"), f"req-{n}") for n in range(200)))

    try:
        assert asyncio.run(burst()) == ["updated"] * 200
    finally:
        recorder.stop()
    assert not recorder._waiting  # the watchdog's list only holds requests still waiting


def test_a_stuck_writer_hands_each_callback_back_to_its_request(
    parts: tuple[Repository, Spool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repository, spool, _url = parts
    release = threading.Event()

    def frozen(callbacks: Sequence[Callback]) -> list[Outcome]:
        release.wait(10)
        return [Outcome.NOT_FOUND for _ in callbacks]

    monkeypatch.setattr(repository, "apply_many", frozen)
    recorder = Recorder(repository, spool, match_window=60, database_timeout=1.0)
    recorder.start()
    submitted: dict[str, float] = {}

    async def submit(deployment_id: str) -> str:
        submitted[deployment_id] = time.time()
        return await recorder.submit(_callback(deployment_id), f"req-{deployment_id}")

    async def staggered() -> list[str]:
        first = asyncio.ensure_future(submit("a"))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(submit("b"))
        return list(await asyncio.gather(first, second))

    try:
        assert asyncio.run(staggered()) == ["queued", "queued"]
    finally:
        release.set()
        recorder.stop()
    kept = {entry.deployment_id: entry.received_at for entry in spool.entries()}
    assert kept.keys() == {"a", "b"}
    # Kept with the time each arrived, not the time its request gave up on the writer (a second
    # later): the run's FechaFin is its arrival, however long the database was stuck.
    for deployment_id, arrived in submitted.items():
        assert arrived <= kept[deployment_id] < arrived + 1.0


def test_while_the_writer_is_stuck_new_callbacks_go_straight_to_the_spool(
    parts: tuple[Repository, Spool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once one request had to take its callback back, the next ones do not each wait the timeout."""
    repository, spool, _url = parts
    release = threading.Event()
    seen: list[list[str]] = []

    def frozen(callbacks: Sequence[Callback], waited: Sequence[float] | None = None) -> list[Outcome]:
        seen.append([callback.deployment_id for callback in callbacks])
        release.wait(30)
        return [Outcome.UPDATED for _ in callbacks]

    monkeypatch.setattr(repository, "apply_many", frozen)
    recorder = Recorder(repository, spool, match_window=60, database_timeout=0.5)
    recorder.start()

    async def scenario() -> tuple[str, str, bool]:
        first = await recorder.submit(_callback("a"), "req-a")
        available = recorder.database_available
        # Going through the writer, the next one would now wait an hour: its answer proves it did not.
        recorder.database_timeout = 3600
        second = await asyncio.wait_for(recorder.submit(_callback("b"), "req-b"), 30)
        return first, second, available

    try:
        assert asyncio.run(scenario()) == ("queued", "queued", False)
        assert seen == [["a"]]  # b never reached the stuck writer
        assert [entry.deployment_id for entry in spool.entries()] == ["a", "b"]
        release.set()
        wait_for(lambda: recorder.database_available, what="el escritor responde de nuevo")
        wait_for(lambda: spool.stats().backlog == 0, what="lo guardado mientras tanto, aplicado")
    finally:
        release.set()
        recorder.stop()


def test_unmatched_and_refused_callbacks_reach_the_alert_hooks(parts: tuple[Repository, Spool, str]) -> None:
    """A run whose row never appears, and a statement the table refuses for good, are both announced."""
    repository, spool, url = parts
    unmatched: list[str] = []
    refused: list[tuple[str, str]] = []
    events = RecorderEvents(
        on_unmatched=lambda entry: unmatched.append(entry.deployment_id),
        on_refused=lambda deployment_id, _status, error: refused.append((deployment_id, error)),
    )
    recorder = Recorder(repository, spool, match_window=0, events=events)
    recorder.start()
    try:
        assert asyncio.run(recorder.submit(_callback("sin-fila"), "req-1")) == "pending_match"
        wait_for(lambda: unmatched == ["sin-fila"], what="aviso de no emparejado")
        insert_run(url, "rechazada")
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql('ALTER TABLE "Ejecuciones" DROP COLUMN "FechaInicioReal"')
        engine.dispose()
        assert asyncio.run(recorder.submit(_callback("rechazada"), "req-2")) == "queued"
    finally:
        recorder.stop()
    assert (
        [d for d, _ in refused] == ["rechazada"]
        and "no such column" in refused[0][1]
        and "FechaInicioReal" in refused[0][1]
    )
    assert spool.stats().refused == 1


async def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` from inside the event loop until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no se cumplió a tiempo: {what}")
        await asyncio.sleep(0.01)


def test_leaving_stuck_mode_keeps_one_runs_callbacks_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A callback still on its way to the spool when the writer recovers is not overtaken by a later one."""
    url = f"sqlite:///{(tmp_path / 'orden.db').as_posix()}"
    repository = Repository(make_engine(url), ["RUN_COMPLETED", "RUN_ABORTED"])
    repository.create_schema()
    insert_run(url, "x")
    insert_run(url, "z")
    spool = Spool(tmp_path / "spool.db")
    spool.open()
    release, gate, entered = threading.Event(), threading.Event(), threading.Event()
    apply_many, add = repository.apply_many, spool.add
    first_call = [True]

    def stuck_once(callbacks: Sequence[Callback], waited: Sequence[float] | None = None) -> list[Outcome]:
        if first_call[0]:
            first_call[0] = False
            release.wait(30)
        return apply_many(callbacks, waited)

    def slow_for_e(items: Any, **kwargs: Any) -> None:
        items = list(items)
        if any(item.request_id == "req-E" for item in items):
            entered.set()
            gate.wait(30)  # a slow fsync: the earlier callback is not in the spool yet
        add(items, **kwargs)

    monkeypatch.setattr(repository, "apply_many", stuck_once)
    monkeypatch.setattr(spool, "add", slow_for_e)
    recorder = Recorder(repository, spool, match_window=60, database_timeout=0.3)
    recorder.start()

    async def scenario() -> list[str]:
        assert await recorder.submit(Callback("z", "RUN_COMPLETED", "{}"), "req-z") == "queued"
        early = asyncio.ensure_future(recorder.submit(Callback("x", "RUN_COMPLETED", "{}"), "req-E"))
        await _until(entered.is_set, "el primer callback de x, camino del spool")
        release.set()
        await _until(lambda: recorder.database_available, "el escritor responde de nuevo")
        late = asyncio.ensure_future(recorder.submit(Callback("x", "RUN_ABORTED", "{}"), "req-L"))
        await asyncio.sleep(0.05)  # let the later one pick its way before the earlier one lands
        gate.set()
        return [await early, await late]

    try:
        assert asyncio.run(scenario()) == ["queued", "queued"]
        wait_for(lambda: spool.stats().backlog == 0, what="el spool aplicado")
    finally:
        release.set()
        gate.set()
        recorder.stop()
    row = fetch_run(url, "x")
    assert row is not None and row["Estado"] == "RUN_COMPLETED"  # the first final state of the run wins


def test_stuck_mode_ends_when_the_database_answers_even_without_the_drain_lease(
    parts: tuple[Repository, Spool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker drains the spool: this one still finds out that the database answers again."""
    repository, spool, _url = parts
    release = threading.Event()
    apply_many = repository.apply_many
    first_call = [True]

    def lost_once(callbacks: Sequence[Callback], waited: Sequence[float] | None = None) -> list[Outcome]:
        if first_call[0]:
            first_call[0] = False
            release.wait(30)
            raise sa.exc.TimeoutError("la conexión congelada acaba en error")
        return apply_many(callbacks, waited)

    monkeypatch.setattr(repository, "apply_many", lost_once)
    monkeypatch.setattr(spool, "claim_lease", lambda: False)
    recorder = Recorder(repository, spool, match_window=60, database_timeout=0.3)
    recorder.start()
    try:
        assert asyncio.run(recorder.submit(_callback("z"), "req-z")) == "queued"
        assert not recorder.database_available
        release.set()
        wait_for(lambda: recorder.database_available, what="el escritor prueba la base de datos y sale del atasco")
    finally:
        release.set()
        recorder.stop()
