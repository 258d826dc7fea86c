"""The upload stage: read the body once, spool it, and refuse it the moment a rule is broken.

Each raw chunk is counted against the request limit, parsed by a *copy* of the stream
(``multipart.py``; a non-multipart body is one file) and only then appended to the spool, so the
bytes that reach the backend are exactly the bytes received, and a chunk that crossed a limit is
the last one read (SPEC §4: "cut off as soon as the count crosses"). Per file: its size is
checked as it grows, its first ``uploads.sniff_bytes`` are sniffed once they are in, and the type
rules run as soon as the role is known. If the role comes from the multipart ``data`` field and
that field follows the files, role-dependent verdicts wait for it (or the end of the body), but
a file over every role's limit, or over the system cap, is refused at once.

``mode: report`` (global or per channel) waives the channel's media settings only: such refusals
are logged and counted in ``report_mode_would_reject_total`` and the upload passes. The system's
limits (``limits.*``: the 20 MB cap, ``max_request_size``, ``max_files``), malformed bodies,
content codings and a full spool are enforced in both modes (``rules.enforced``).

``Content-Encoding`` other than ``identity`` is refused with 415: limits must hold on what the
file really is (no gzip bombs) and the backend must receive what the client sent, and inflating
to inspect then forwarding the coded bytes would inspect one thing and deliver another.

On *any* exit by exception, cancellation included, the spool is closed before the exception
propagates, and the spool file never had a name on disk to begin with (``spool.py``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from python_multipart.multipart import parse_options_header

from gateway.config.model import Config, Role
from gateway.errors import GatewayError
from gateway.inspect.counter import ByteCounter
from gateway.inspect.multipart import MultipartInspector, Part, boundary_from
from gateway.inspect.precheck import (
    announced_length,
    encoding_error,
    mode_of,
    raw_filename,
    request_too_large,
)
from gateway.inspect.sniffer import Sniffer, default_sniffer
from gateway.metrics import Metrics
from gateway.policy import rules
from gateway.policy.role import ROLES, role_from_claims, role_from_form, waits_for_form
from gateway.policy.routes import UploadTarget
from gateway.spool import Spool, SpoolBudget

log = logging.getLogger("gateway.inspect")


class InspectedUpload:
    """An accepted body, spooled, ready to be forwarded unchanged."""

    def __init__(
        self, spool: Spool, files: list[rules.FileVerdict], role: Role, reported: list[GatewayError]
    ) -> None:
        self._spool = spool
        self.files = files
        self.role = role
        self.reported = reported  # what mode: report let through
        self.would_reject: str | None = reported[0].code if reported else None

    @property
    def content_length(self) -> int:
        return self._spool.size

    def body(self) -> bytes | AsyncIterator[bytes]:
        """The exact bytes as received: one ``bytes`` for a body kept whole in memory in one
        piece, an iterator over its pieces if it was kept in several, else :meth:`chunks`."""
        pieces = self._spool.in_memory()
        if pieces is None:
            return self.chunks()
        if len(pieces) == 1:
            return pieces[0]
        return _each(pieces)

    def chunks(self) -> AsyncIterator[bytes]:
        """The exact bytes as received (decrypted from the spool file if it spilled): the
        spool's own iterator, not one more generator for every chunk to pass through."""
        return self._spool.chunks()

    async def aclose(self) -> None:
        """Releases the spool; idempotent."""
        await self._spool.aclose()

    async def __aenter__(self) -> InspectedUpload:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


class _Inspection:
    """The state of one upload's inspection; :meth:`feed` each chunk, then :meth:`finish`."""

    def __init__(
        self,
        headers: Mapping[str, str],
        target: UploadTarget,
        claims: Mapping[str, Any],
        config: Config,
        sniffer: Sniffer,
        metrics: Metrics | None,
    ) -> None:
        self.config, self.target, self.sniffer, self.metrics = config, target, sniffer, metrics
        self.mode = mode_of(config, target)
        self.sniff_bytes = config.uploads.sniff_bytes
        self.request = ByteCounter(config.limits.max_request_size)
        self.reported: list[GatewayError] = []
        self.reasons: dict[int, str] = {}  # part index -> first refusal, for the verdicts
        self._policies: dict[Role, rules.EffectivePolicy] = {}
        self.inspector: MultipartInspector | None = None
        self.raw: Part | None = None
        kind, options = parse_options_header(headers.get("Content-Type", ""))
        multipart = kind == b"multipart/form-data"
        self.role: Role | None = role_from_claims(config, claims)
        if self.role is None and not waits_for_form(config, claims, multipart):
            self.role = config.uploads.role.default
        if multipart:
            form = config.uploads.role.from_form
            self.inspector = MultipartInspector(
                boundary_from(headers.get("Content-Type", ""), options),
                self.sniff_bytes,
                form.field if form is not None else None,
            )
        else:
            self.raw = Part(
                0,
                None,
                raw_filename(headers, target),
                headers.get("Content-Type"),
                is_file=True,
                in_form=False,
            )

    @property
    def files(self) -> list[Part]:
        if self.inspector is not None:
            return [part for part in self.inspector.files if not part.ignored]
        return [self.raw] if self.raw is not None else []

    def policy(self, role: Role) -> rules.EffectivePolicy:
        # Asked for every chunk of every part; the answer cannot change within one upload.
        known = self._policies.get(role)
        if known is None:
            known = self._policies[role] = rules.effective_policy(
                self.config, self.target.channel, role
            )
        return known

    def handle(self, error: GatewayError | None, index: int = -1) -> None:
        """Raise ``error``, or, when ``mode: report`` waives it, log it and count the upload.

        Report mode records what enforce would have answered: the first refusal of each file
        (``index``; -1 for the request), and the upload is counted once in ``would_reject``.
        """
        if error is None:
            return
        if rules.enforced(error, self.mode):
            self.reasons.setdefault(index, error.code)
            raise error
        if index in self.reasons:
            return
        self.reasons[index] = error.code
        self.reported.append(error)
        if self.metrics is not None and len(self.reported) == 1:
            self.metrics.would_reject.labels(error.code, self.target.channel).inc()
        log.warning(
            "mode report: would refuse %s on channel %s: %s",
            error.code,
            self.target.channel,
            error.detail,
        )

    def start(self) -> None:
        if self.role is not None:
            self._check_enabled(self.role)
        elif not any(self.policy(role).enabled for role in ROLES):
            self.handle(rules.disabled_error(self.policy(self.config.uploads.role.default)))

    def _check_enabled(self, role: Role) -> None:
        policy = self.policy(role)
        if not policy.enabled:
            self.handle(rules.disabled_error(policy))

    async def feed(self, chunk: bytes) -> None:
        if self.request.add(len(chunk)):
            self.handle(request_too_large(self.config, self.target, self.role))
        if self.inspector is None:
            assert self.raw is not None
            self._grow_raw(chunk)
            touched = [self.raw]
        else:
            touched = self.inspector.feed(chunk)
            if self.inspector.file_count > self.config.limits.max_files:
                self.handle(self._too_many_files())
            if self.role is None and self.inspector.role_value is not None:
                # before the files this chunk touched: those after the data field are its role's
                # (judging them as of an unknown role would make the answer depend on the chunking)
                await self._role_known(self._form_role())
        for part in touched:
            await self._check_part(part)

    def _grow_raw(self, chunk: bytes) -> None:
        assert self.raw is not None
        self.raw.size += len(chunk)
        room = self.sniff_bytes - len(self.raw.head)
        if room > 0:
            self.raw.head += chunk[:room]

    def _too_many_files(self) -> GatewayError:
        limit = self.config.limits.max_files
        return GatewayError(
            "too_many_files",
            f"more than {limit} files in one request (set by limits.max_files)",
            limit=limit,
            limit_source="limits.max_files",
            channel=self.target.channel,
            role=self.role,
        )

    def _form_role(self) -> Role:
        assert self.inspector is not None
        found = role_from_form(self.config.uploads.role.from_form, self.inspector.role_value)
        return found or self.config.uploads.role.default

    async def _role_known(self, role: Role) -> None:
        """The role arrived with the body: apply what had to wait for it."""
        self.role = role
        self._check_enabled(role)
        for part in self.files:
            await self._check_part(part)

    async def _check_part(self, part: Part) -> None:
        """Size and type, in the order a file breaks them as it arrives (``size_first``)."""
        if part.ignored:
            return
        size_first = self._size_first()
        if size_first:
            self._check_size(part)
        await self._check_type(part)
        if not size_first:
            self._check_size(part)

    def _size_first(self) -> bool:
        """:attr:`~rules.EffectivePolicy.size_first` of the role; while the role is unknown,
        of the loosest one (a file is refused for its size only once it is over every role's
        limit)."""
        if self.role is not None:
            return self.policy(self.role).size_first
        return all(self.policy(role).size_first for role in ROLES)

    async def _check_type(self, part: Part) -> None:
        if part.sniffed is None and (len(part.head) >= self.sniff_bytes or part.ended):
            part.sniffed = await self.sniffer.sniff_async(bytes(part.head), part.filename)
            mismatch = rules.check_spoofing(self._facts(part))
            if mismatch is not None:
                # the role may still be unknown: the allowed list is then the default role's
                policy = self.policy(self.role or self.config.uploads.role.default)
                rules.mismatch_fields(mismatch, policy, self.role)
            self.handle(mismatch, part.index)
        if part.sniffed is not None and self.role is not None and not part.judged:
            part.judged = True
            self.handle(rules.check_allowed(self.policy(self.role), self._facts(part)), part.index)

    def _check_size(self, part: Part) -> None:
        """The file limit of the role; while the role is unknown, only what every role breaks."""
        role = self.role or self.config.uploads.role.default
        policy = self.policy(role)
        if part.size > policy.system_cap:
            self.handle(rules.file_too_large(rules.capped(policy), part.filename), part.index)
        elif self.role is not None:
            self.handle(rules.check_size(policy, part.size, part.filename), part.index)
        elif self.mode == "enforce":
            enabled = [self.policy(r) for r in ROLES if self.policy(r).enabled]
            if enabled and all(part.size > p.max_file_size for p in enabled):
                loosest = max(enabled, key=lambda p: p.max_file_size)
                self.handle(rules.file_too_large(loosest, part.filename), part.index)

    def _facts(self, part: Part) -> rules.FileFacts:
        return rules.FileFacts(
            part.filename, part.content_type, part.sniffed or "", part.size, part.name
        )

    def close(self) -> None:
        if self.inspector is not None:
            self.inspector.close()

    async def finish(self) -> list[rules.FileVerdict]:
        if self.inspector is not None:
            self.inspector.finish()
            if self.role is None:
                await self._role_known(self._form_role())
        elif self.raw is not None:
            self.raw.ended = True
            await self._check_part(self.raw)
        verdicts = []
        for part in self.files:
            facts = self._facts(part)
            verdicts.append(rules.FileVerdict.of(facts, self.reasons.get(part.index)))
            if self.metrics is not None:
                self.metrics.upload_size.labels(self.target.channel, self.role).observe(part.size)
        return verdicts


async def _each(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def inspect_upload(
    body: AsyncIterable[bytes],
    headers: Mapping[str, str],
    target: UploadTarget,
    claims: Mapping[str, Any],
    config: Config,
    spool_limits: SpoolBudget,
    metrics: Metrics | None,
    *,
    sniffer: Sniffer | None = None,
) -> InspectedUpload:
    """Read, inspect and spool the whole body; raises :class:`GatewayError` on refusal.

    On any exit by exception no spool remains.
    """
    error = encoding_error(headers)
    if error is not None:
        raise error
    inspection = _Inspection(headers, target, claims, config, sniffer or default_sniffer(), metrics)
    spool = Spool(config.spool, spool_limits, metrics, expected_size=announced_length(headers))
    try:
        inspection.start()
        async for chunk in body:
            await inspection.feed(chunk)
            await spool.write(chunk)
        files = await inspection.finish()
        await spool.seal()
    except BaseException:
        await spool.aclose()
        raise
    finally:
        inspection.close()
    role = inspection.role or config.uploads.role.default
    return InspectedUpload(spool, files, role, inspection.reported)
