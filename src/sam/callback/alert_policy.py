"""Which alert conditions become mail, and when: thresholds, the database timer, one mail per interval."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .alert_texts import AlertKind, DatabaseBack, DatabaseDown, Occurrence, Refusal, RefusedCallbacks
from .domain import AuthFailure, describe

AUTH_WINDOW_SECONDS = 600.0
# Occurrences listed in one mail (the most recent); the rest are only counted.
_LISTED = 20
# Distinct address/answer/reason triples remembered for one refused-callbacks mail.
_SOURCES = 100
# After a mail that could not be delivered, the next try for its condition comes this soon
# (the repeat interval counts delivered mails only).
RETRY_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Alert:
    """One mail's worth: a condition, what happened (newest last), and what the limit held back."""

    kind: AlertKind
    occurrences: tuple[tuple[float, Occurrence], ...]
    unlisted: int = 0
    # Occurrences held back by the repeat interval; for refused callbacks, those counted since the last mail.
    held: int = 0
    # When the policy let it go (the policy's clock): a failed send rewinds the interval only if
    # no newer mail of its kind went after it.
    at: float = 0.0


class _RefusalTally:
    """Refused callbacks counted by address, answer and reason, in bounded memory."""

    def __init__(self) -> None:
        self.total = 0
        self.counts: dict[tuple[str, int, tuple[AuthFailure, ...]], int] = {}
        self.others = 0

    def merge(self, other: _RefusalTally) -> None:
        for (client, status, reasons), count in other.counts.items():
            self.add(Refusal(client, status, reasons), count)
        self.total += other.others
        self.others += other.others

    def add(self, refusal: Refusal, count: int = 1) -> None:
        self.total += count
        key = (refusal.client, refusal.status, refusal.reasons)
        if key in self.counts or len(self.counts) < _SOURCES:
            self.counts[key] = self.counts.get(key, 0) + count
        else:
            self.others += count

    def summary(self, *, since_last_mail: bool = False) -> RefusedCallbacks:
        ranked = sorted(self.counts.items(), key=lambda item: (-item[1], item[0][:2], describe(item[0][2])))
        listed = ranked[:_LISTED]
        others = self.others + sum(count for _, count in ranked[_LISTED:])
        return RefusedCallbacks(
            total=self.total,
            sources=tuple((client, status, describe(reasons), count) for (client, status, reasons), count in listed),
            others=others,
            since_last_mail=since_last_mail,
        )


@dataclass(slots=True)
class _Held:
    items: deque[tuple[float, Occurrence]]
    count: int = 0


class AlertPolicy:
    """Which conditions become alerts, and when; plain state, driven by one thread with explicit time."""

    def __init__(
        self,
        *,
        auth_failures: int,
        database_seconds: float,
        repeat_seconds: float,
        backlog: Callable[[], int | None] = lambda: None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.auth_failures = auth_failures
        self.database_seconds = database_seconds
        self.repeat_seconds = repeat_seconds
        self.retry_seconds = min(retry_seconds, repeat_seconds)
        self.backlog = backlog
        self._window: deque[tuple[float, Refusal]] = deque()
        self._last_sent: dict[AlertKind, float] = {}
        self._held: dict[AlertKind, _Held] = {}
        # Refusals counted after a refused-callbacks mail, while its repeat interval runs.
        self._refusals_since_mail: _RefusalTally | None = None
        # What the last refused-callbacks alert counted: held again if its mail is not delivered.
        self._last_refusals: _RefusalTally | None = None
        # Kinds whose last mail was not delivered: the next one is not "since the previous mail".
        self._unmailed: set[AlertKind] = set()
        # Sends failed in a row, by kind: each retry waits twice as long, up to the repeat interval
        # (a wrong password must not log in to the mail server every minute for ever).
        self._failures: dict[AlertKind, int] = {}
        # Callbacks answered 503 since the database last answered: the spool could not keep them.
        self._lost_since_up = 0
        self._down_since: float | None = None
        self._down_error: str | None = None
        # None while no alert was raised for the current outage; else whether it was mailed.
        self._down_mailed: bool | None = None

    def refusal(self, refusal: Refusal, now: float, wall: float) -> list[Alert]:
        """A callback refused with 401, 403 or 429.

        Until the threshold is reached, refusals wait in a 10-minute window. Once a mail went out,
        every refusal until its repeat interval ends is counted, whatever their number, and mailed
        when the interval ends (logged at ERROR at stop): none ages out of a window unreported.
        """
        if self.auth_failures <= 0:
            return []
        kind = AlertKind.REFUSED_CALLBACKS
        if not self._may_send(kind, now) or self._refusals_since_mail is not None:
            if self._refusals_since_mail is None:
                self._refusals_since_mail = _RefusalTally()
            self._refusals_since_mail.add(refusal)
            # The interval may be over with the tick still to come: then this mail goes now.
            return self._mail_refusals_since(now, wall) if self._may_send(kind, now) else []
        window = self._window
        window.append((now, refusal))
        while window and now - window[0][0] > AUTH_WINDOW_SECONDS:
            window.popleft()
        if len(window) < self.auth_failures:
            return []
        tally = _RefusalTally()
        for _, each in window:
            tally.add(each)
        window.clear()
        self._last_sent[kind] = now
        self._last_refusals = tally
        return [Alert(kind, ((wall, tally.summary()),), at=now)]

    def _mail_refusals_since(self, now: float, wall: float) -> list[Alert]:
        tally, self._refusals_since_mail = self._refusals_since_mail, None
        if tally is None or not tally.total:
            return []
        kind = AlertKind.REFUSED_CALLBACKS
        self._last_sent[kind] = now
        self._last_refusals = tally
        if kind in self._unmailed:
            # The previous mail never arrived: this one is the first the operator reads.
            self._unmailed.discard(kind)
            return [Alert(kind, ((wall, tally.summary()),), at=now)]
        return [Alert(kind, ((wall, tally.summary(since_last_mail=True)),), held=tally.total, at=now)]

    def not_sent(self, alert: Alert, now: float, wall: float) -> list[Alert]:
        """`alert`'s mail could not be delivered: it is not its condition's mail for the interval.

        What it said is held again and tried with what has happened since, `retry_seconds`
        from now instead of a whole repeat interval later (SPEC 9 counts mails, not attempts).
        """
        kind = alert.kind
        if self._last_sent.get(kind) != alert.at:
            # A newer mail of this kind already went: it stands for the interval. What this one
            # said was logged at ERROR with its text; the next mail counts nothing twice.
            return []
        failures = self._failures[kind] = self._failures.get(kind, 0) + 1
        delay = min(self.retry_seconds * 2 ** (failures - 1), self.repeat_seconds)
        self._last_sent[kind] = now - self.repeat_seconds + delay
        self._unmailed.add(kind)
        if kind is AlertKind.REFUSED_CALLBACKS:
            lost, self._last_refusals = self._last_refusals, None
            if lost is not None:
                pending = _RefusalTally()
                pending.merge(lost)
                if self._refusals_since_mail is not None:
                    pending.merge(self._refusals_since_mail)
                self._refusals_since_mail = pending
        elif kind is AlertKind.DATABASE_DOWN:
            if self._down_since is not None:
                self._down_mailed = None  # raised again, with the outage's length so far
        else:
            held = self._held_for(kind)
            earlier = list(held.items)
            held.items.clear()
            held.items.extend([*alert.occurrences, *earlier])
            held.count += alert.unlisted + len(alert.occurrences)
        return []

    def occurrence(self, kind: AlertKind, what: Occurrence, now: float, wall: float) -> list[Alert]:
        """Something that is an alert on its own (a 503, a refusal for good, unmatched, rejected)."""
        if kind is AlertKind.UNAVAILABLE:
            self._lost_since_up += 1
        return self._emit(kind, what, now, wall)

    def database_down(self, error: str | None, now: float, wall: float) -> list[Alert]:
        """The writer could not reach the database; the alert waits for `database_seconds`."""
        if self._down_since is None:
            self._down_since = now
        self._down_error = error
        return self._check_database(now, wall)

    def database_up(self, now: float, wall: float) -> list[Alert]:
        """The database answers again: a second mail when the outage raised the first."""
        lost, self._lost_since_up = self._lost_since_up, 0
        if self._down_since is None:
            return []
        seconds = now - self._down_since
        mailed = self._down_mailed
        self._down_since, self._down_error, self._down_mailed = None, None, None
        if mailed is None:
            return []
        back = DatabaseBack(seconds, self.backlog(), lost)
        return self._emit(AlertKind.DATABASE_BACK, back, now, wall, force=mailed)

    def delivered(self, kind: AlertKind, now: float, wall: float) -> list[Alert]:
        """A mail of `kind` reached the mail server: the next failure starts the retries afresh."""
        self._failures.pop(kind, None)
        return []

    def tick(self, now: float, wall: float) -> list[Alert]:
        """Periodic work: the database timer, and held alerts whose repeat interval is over."""
        alerts = self._check_database(now, wall)
        if self._may_send(AlertKind.REFUSED_CALLBACKS, now):
            alerts += self._mail_refusals_since(now, wall)
        for kind in list(self._held):
            if self._may_send(kind, now):
                alerts += self.flush_kind(kind, now, wall)
        return alerts

    def flush(self, now: float, wall: float) -> list[Alert]:
        """Every held alert, whatever the interval (at stop, where their count would otherwise be lost)."""
        alerts = self._mail_refusals_since(now, wall)
        for kind in list(self._held):
            alerts += self.flush_kind(kind, now, wall)
        return alerts

    def flush_kind(self, kind: AlertKind, now: float, wall: float) -> list[Alert]:
        """The alerts of one kind held back by the repeat interval, as one mail."""
        held = self._held.pop(kind, None)
        if held is None or not held.count:
            return []
        self._last_sent[kind] = now
        # After an undelivered mail nothing was "held back since the previous one": it never came.
        count = 0 if kind in self._unmailed else held.count
        self._unmailed.discard(kind)
        return [Alert(kind, tuple(held.items), unlisted=held.count - len(held.items), held=count, at=now)]

    def _check_database(self, now: float, wall: float) -> list[Alert]:
        if self._down_since is None or self._down_mailed is not None:
            return []
        seconds = now - self._down_since
        if seconds < self.database_seconds:
            return []
        down = DatabaseDown(seconds, self._down_error, self.backlog(), self._lost_since_up)
        alerts = self._emit(AlertKind.DATABASE_DOWN, down, now, wall)
        self._down_mailed = bool(alerts)
        return alerts

    def _may_send(self, kind: AlertKind, now: float) -> bool:
        last = self._last_sent.get(kind)
        return last is None or now - last >= self.repeat_seconds

    def _held_for(self, kind: AlertKind) -> _Held:
        held = self._held.get(kind)
        if held is None:
            held = self._held[kind] = _Held(deque(maxlen=_LISTED))
        return held

    def _emit(self, kind: AlertKind, what: Occurrence, now: float, wall: float, *, force: bool = False) -> list[Alert]:
        if not force and not self._may_send(kind, now):
            held = self._held_for(kind)
            held.items.append((wall, what))
            held.count += 1
            return []
        held_or_none = self._held.pop(kind, None)
        items = list(held_or_none.items) if held_or_none else []
        count = held_or_none.count if held_or_none else 0
        items = [*items, (wall, what)][-_LISTED:]
        self._last_sent[kind] = now
        unlisted = count + 1 - len(items)
        if kind in self._unmailed:
            self._unmailed.discard(kind)
            count = 0
        return [Alert(kind, tuple(items), unlisted=unlisted, held=count, at=now)]
