"""Response ids that carry what feedback needs, signed by the server, so that feedback needs no
lookup: an answer to an experiment or a canary release is named

    lf1.<payload>.<mac>

`payload` is base64url (unpadded) of: the release arm (1 byte: 0 none, 1 control, 2 candidate),
when the answer was given (4 bytes, Unix seconds, big-endian), a random nonce (8 bytes), then the
experiment, the variant, the adapter and the adapter's version, each one length byte and UTF-8
(empty: none). `mac` is HMAC-SHA256(secret, "lf1.<payload>") cut to 16 bytes (128 bits),
base64url. About 100 characters of `[A-Za-z0-9_.-]`. The payload is signed, not encrypted: its
holder can read which variant answered (the response's headers say so anyway), and no one
without the secret can make one or change a byte of it.

The secret is the app's, the same for every ingress replica and across restarts (`load_secret`,
called by the experiment state replica, which hands it to the ingress replicas): the environment
variable LORAFLEET_FEEDBACK_SECRET (32 characters or more), else the file that
LORAFLEET_FEEDBACK_SECRET_FILE names, else 32 random bytes generated at the first start and kept
beside the experiment state, `<storage.root>/experiments/<app>/feedback-secret`. It is never
logged, and never read from YAML.

`RewardedOnce` is what keeps "a response is rewarded once" without a table of answers: the
nonces of the ids already rewarded, bounded by age and by count (see its docstring).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import os
import re
import secrets
import struct
import time
from dataclasses import asdict, dataclass

PREFIX = "lf1"
SECRET_ENV = "LORAFLEET_FEEDBACK_SECRET"
SECRET_FILE_ENV = "LORAFLEET_FEEDBACK_SECRET_FILE"
SECRET_NAME = "feedback-secret"  # beside state.json (serve/experiments.py: state_uri)
MIN_SECRET_CHARS = 32
MAC_BYTES = 16
NONCE_BYTES = 8
ARMS = ("", "control", "candidate")  # serve/release.py's arms; "" when no release answered
CLOCK_SKEW_S = 300  # an id "given" this far in the future still verifies (replicas' clocks)
MAX_REWARDED = 200_000  # rewarded ids remembered (a nonce and a time each, ~150 bytes)
_HEAD = struct.Struct(">BI8s")  # arm, issued, nonce
_SHAPE = re.compile(rf"{PREFIX}\.[A-Za-z0-9_-]{{20,1200}}\.[A-Za-z0-9_-]{{22}}", re.ASCII)


class BadResponseId(ValueError):
    """A response id that cannot be rewarded: `status` (400 or 410) and why, for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Answer:
    """What a verified response id says: who answered, with which version, when."""

    issued: int  # Unix seconds
    nonce: str  # base64url: the id's own key in RewardedOnce
    experiment: str | None = None
    variant: str | None = None
    adapter: str | None = None
    version: str | None = None
    arm: str | None = None  # control | candidate while a release ran

    def as_dict(self) -> dict:
        return asdict(self)


def is_signed(response_id) -> bool:
    """True for an id in this module's format (verified or not); other strings are the ids an
    ingress replica recorded with the state replica before it held the secret."""
    return isinstance(response_id, str) and response_id.startswith(PREFIX + ".")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FeedbackIds:
    """Signs and verifies response ids with the app's secret; ids older than `max_age_s`
    (http.feedback_max_age_s) are refused."""

    def __init__(self, secret: bytes, max_age_s: float):
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"a feedback secret needs {MIN_SECRET_CHARS} bytes or more")
        self._secret = secret
        self.max_age_s = max_age_s

    def __repr__(self) -> str:  # never the secret
        return f"FeedbackIds(max_age_s={self.max_age_s})"

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._secret, signed.encode(), hashlib.sha256).digest()[:MAC_BYTES])

    def sign(self, experiment=None, variant=None, adapter=None, version=None, arm=None, now=None):
        """A new id for one answer (its own nonce: two answers never share an id)."""
        issued = int(time.time() if now is None else now)
        raw = _HEAD.pack(ARMS.index(arm or ""), issued, secrets.token_bytes(NONCE_BYTES))
        for text in (experiment, variant, adapter, version):
            b = (text or "").encode()
            raw += bytes([len(b)]) + b  # names are at most 128 characters (cluster/config)
        signed = f"{PREFIX}.{_b64(raw)}"
        return f"{signed}.{self._mac(signed)}"

    def verify(self, response_id, now: float | None = None) -> Answer:
        """The id's Answer; BadResponseId 400 for anything not signed with this secret (garbage,
        truncated, altered, another server's), 410 once it is older than max_age_s."""
        if not isinstance(response_id, str) or not _SHAPE.fullmatch(response_id):
            shown = response_id if isinstance(response_id, str) else type(response_id).__name__
            raise BadResponseId(
                400,
                f"malformed response id {str(shown)[:120]!r}: expected the X-Lorafleet-Response-Id "
                f"of an answer, {PREFIX}.<payload>.<mac> (truncated or changed in transit?)",
            )
        signed, _, mac = response_id.rpartition(".")
        if not hmac.compare_digest(self._mac(signed).encode(), mac.encode()):
            raise BadResponseId(
                400,
                "response id does not match its signature: altered, or not given by this server "
                "(or given before its feedback secret changed)",
            )
        try:
            answer = _decode(_unb64(signed.split(".", 1)[1]))
        except (ValueError, IndexError, struct.error, binascii.Error, UnicodeDecodeError):
            raise BadResponseId(400, "response id's payload cannot be read") from None
        now = time.time() if now is None else now
        if answer.issued > now + CLOCK_SKEW_S:
            raise BadResponseId(400, "response id was given in the future (a clock is off)")
        age = now - answer.issued
        if age > self.max_age_s:
            raise BadResponseId(
                410,
                f"response id expired: its answer was given {age / 3600:.1f} h ago, and feedback "
                f"is taken for http.feedback_max_age_s ({self.max_age_s:g} s)",
            )
        return answer


def _decode(raw: bytes) -> Answer:
    arm, issued, nonce = _HEAD.unpack_from(raw)
    fields, at = [], _HEAD.size
    for _ in range(4):
        n = raw[at]
        fields.append(raw[at + 1 : at + 1 + n].decode() or None)
        at += 1 + n
    if at != len(raw) or arm >= len(ARMS):
        raise ValueError("trailing or unknown bytes")
    return Answer(issued, _b64(nonce), *fields, arm=ARMS[arm] or None)


class RewardedOnce:
    """The nonces of the signed ids already rewarded, each with when its answer was given: an
    id is rewarded once (409 after). Bounded without giving that up: an entry leaves when its id
    is older than max_age (it would be refused as expired anyway) or when more than `limit` are
    held (the oldest leaves); either way `floor` rises to the time of what left, and any id
    given at or before `floor` is refused (410) rather than risk counting it again. The state
    replica keeps it in state.json, in the same write as the outcomes it guards."""

    def __init__(self, limit: int = MAX_REWARDED, floor: int = 0):
        self.limit, self.floor = limit, floor
        self.ids: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def claim(self, nonce: str, issued: int, now: float, max_age_s: float) -> int | None:
        """None: rewarded now (it was not before); else the status that refuses it (409, 410)."""
        while self._heap and self._heap[0][0] < now - max_age_s:
            self._drop()
        if nonce in self.ids:
            return 409
        if issued <= self.floor:
            return 410
        self.ids[nonce] = issued
        heapq.heappush(self._heap, (issued, nonce))
        while len(self.ids) > self.limit:
            self._drop()
        return None

    def _drop(self) -> None:
        issued, nonce = heapq.heappop(self._heap)
        del self.ids[nonce]
        self.floor = max(self.floor, issued)

    def to_json(self) -> dict:
        return {"floor": self.floor, "ids": self.ids}

    @classmethod
    def from_json(cls, saved: dict, limit: int = MAX_REWARDED) -> RewardedOnce:
        """ValueError or TypeError for anything but what `to_json` wrote."""
        out = cls(limit, int(saved["floor"]))
        for nonce, issued in dict(saved["ids"]).items():
            if not isinstance(nonce, str) or not isinstance(issued, int):
                raise ValueError(f"a rewarded id must be a nonce and a time. Got {nonce!r}")
            out.ids[nonce] = issued
            out._heap.append((issued, nonce))
        heapq.heapify(out._heap)
        while len(out.ids) > out.limit:
            out._drop()
        return out


# --- the secret ----------------------------------------------------------------------------------


def secret_from_env(environ=None) -> bytes | None:
    """The secret the environment sets (the variable, else the file it names), or None. A
    ValueError names what is wrong (too short, unreadable) without showing the secret."""
    env = os.environ if environ is None else environ
    text, where = env.get(SECRET_ENV, ""), SECRET_ENV
    if not text.strip() and env.get(SECRET_FILE_ENV):
        where = f"{SECRET_FILE_ENV} ({env[SECRET_FILE_ENV]})"
        try:
            with open(os.path.expanduser(env[SECRET_FILE_ENV])) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"{where}: cannot read it ({e.strerror or e})") from None
    text = text.strip()
    if not text:
        return None
    if len(text) < MIN_SECRET_CHARS:
        raise ValueError(
            f"{where} holds {len(text)} characters; a feedback secret needs {MIN_SECRET_CHARS} "
            "or more (e.g. `openssl rand -base64 32`)"
        )
    return text.encode()


def load_secret(state_uri: str | None, environ=None, log=print) -> bytes:
    """The app's secret: from the environment (`secret_from_env`), else the one kept beside the
    experiment state (`state_uri`'s folder), generated there at the first start. Without a
    state_uri (an app kept in memory), a new one each start."""
    from_env = secret_from_env(environ)
    if from_env is not None:
        return from_env
    if not state_uri:
        return secrets.token_bytes(32)
    from cluster.store import storage

    uri = storage.join(state_uri.rsplit("/", 1)[0], SECRET_NAME)
    if not storage.exists(uri):
        _create(uri, _b64(secrets.token_bytes(32)) + "\n")
        log(f"[experiments] generated the feedback secret at {uri}")
    try:
        secret = _unb64(storage.read_text(uri).strip())
    except (ValueError, binascii.Error) as e:
        raise ValueError(f"{uri} is not a feedback secret ({e}); delete it for a new one") from None
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{uri} holds a feedback secret too short; delete it for a new one")
    return secret


def _create(uri: str, text: str) -> None:
    """Write a new secret file: a local one only readable by its owner, and never over another
    (the first writer wins; every reader then reads the same)."""
    from cluster.store import storage

    if storage.is_remote(uri):
        storage.write_text(uri, text)
        return
    path = os.path.expanduser(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(text)
