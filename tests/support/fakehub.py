"""A fake Hugging Face hub on 127.0.0.1, serving small local checkpoints, with injectable faults.

Tests and benchmarks must drive the real online download path (``huggingface_hub``'s HEAD and
GET on ``/{repo}/resolve/{revision}/{file}``) without the internet. :class:`FakeHub` answers
those two requests the way the hub does, from caches laid out by
:func:`mechgen.sources.hubcache.build_offline_cache` (the server's own copy, never the client's):

- ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag`` (and,
  for LFS files, ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges``;
  ``Range: bytes=N-`` gives a 206 (huggingface_hub resumes a broken download that way);
  ``revision`` is a branch name or a commit hash;
- errors as the hub sends them: 404 with ``X-Error-Code`` ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound`` (the last with ``X-Repo-Commit``), which
  huggingface_hub turns into its typed errors.

Faults (:class:`Fault`) are matched per request (method, repo, revision, file pattern) and each
hits ``times`` requests: an HTTP status (429 with optional ``Retry-After``, 500, 503...), a
body cut off mid-way (``truncate``: full ``Content-Length``, then the connection closes), a short
body (``short``: a smaller ``Content-Length`` than the HEAD announced), a corrupt body
(``corrupt``: same size, first byte flipped), or a replacement body (``replace``: other bytes,
e.g. a malicious pickle, under the genuine etag). Every request is logged (:attr:`requests`)
with its timing, so tests count downloads and measure concurrency.

Safety: binds only to a loopback address; the server stops by itself after ``max_seconds`` or
``max_requests`` (a watchdog thread), and request handling has no unbounded loop.

Also here: small random GPT-NeoX or GPT-2 checkpoints and a tiny byte-level BPE tokenizer to
serve (:func:`train_tiny_tokenizer`, :func:`tiny_gpt_neox_config`, :func:`tiny_gpt2_config`,
:func:`save_random_checkpoint`).

Command line (serves every repo of a cache built by ``build_offline_cache``)::

    python -m mechgen.fakehub SERVER_CACHE_DIR [--port 0] [--max-seconds 900]

prints ``HF_ENDPOINT=http://127.0.0.1:PORT`` and serves until the time limit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import ipaddress
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

from mechgen.sources.hubcache import is_lfs_file
from support.offline_hub import build_offline_cache

FAULT_KINDS = ("status", "truncate", "short", "corrupt", "replace")
_sleep = time.sleep  # bound at import: tests that stub time.sleep must not unthrottle the server
_RESOLVE_PATH = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Fault:
    """One injected failure, hitting the next ``times`` requests that match it.

    ``kind``: ``status`` (reply ``status``, with ``Retry-After: retry_after`` if given),
    ``truncate`` (send half the body under the full ``Content-Length``, then close),
    ``short`` (announce and send only half the body), ``corrupt`` (flip the first byte),
    ``replace`` (send ``body`` instead of the file; GET only). Matching: ``method`` (HEAD, GET
    or None for both), ``repo_id``, ``revision`` (as written in the URL: branch or commit),
    ``filename`` (an fnmatch pattern); None matches anything. The first ``after`` matching
    requests are let through untouched. ``times=None`` never runs out.
    """

    kind: str
    method: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    times: int | None = 1
    status: int = 500
    retry_after: float | None = None
    body: bytes | None = None
    after: int = 0
    hits: int = 0
    seen: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r} unknown; allowed: {', '.join(FAULT_KINDS)}")
        if self.method not in (None, "HEAD", "GET"):
            raise ValueError(f"fault method must be HEAD, GET or None, not {self.method!r}")
        if self.kind == "replace" and self.body is None:
            raise ValueError("a 'replace' fault needs the body to send")
        if self.kind in ("truncate", "short", "corrupt", "replace") and self.method == "HEAD":
            raise ValueError(f"a {self.kind!r} fault changes a body: it applies to GET only")

    def matches(self, method: str, repo_id: str, revision: str, filename: str) -> bool:
        """Whether the request fits this fault's filters (hits left or not)."""
        if self.kind != "status" and method != "GET":
            return False
        return (
            (self.method is None or self.method == method)
            and (self.repo_id is None or self.repo_id == repo_id)
            and (self.revision is None or self.revision == revision)
            and (self.filename is None or fnmatch.fnmatch(filename, self.filename))
        )

    def take(self, method: str, repo_id: str, revision: str, filename: str) -> bool:
        """Count a matching request; True if this fault hits it (past ``after``, hits left)."""
        if not self.matches(method, repo_id, revision, filename):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


@dataclass
class Request:
    """One request to the fake hub: what was asked, the status, bytes of body sent, and when it
    started and finished (``time.monotonic()`` seconds; ``finished`` None while in progress).

    Logged when it arrives and its status set before the response goes out, so a client that
    has its answer always finds the request in the log.
    """

    method: str
    repo_id: str
    revision: str
    filename: str
    status: int = 0
    bytes_sent: int = 0
    started: float = 0.0
    finished: float | None = None
    fault: str | None = None


@dataclass
class _File:
    path: Path
    etag: str
    size: int
    lfs: bool


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class FakeHub:
    """The fake hub: add repos, inject faults, ``start()`` (or ``with FakeHub() as hub:``).

    ``bytes_per_s`` slows every GET body to about that rate (None: as fast as possible), so
    downloads last long enough to overlap; ``chunk_bytes`` is the write size.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        max_seconds: float = 900.0,
        max_requests: int = 100_000,
        bytes_per_s: float | None = None,
        chunk_bytes: int = 64 * 1024,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"the fake hub serves on loopback only, not on {host!r}")
        if max_seconds <= 0 or max_requests < 1:
            raise ValueError("max_seconds must be > 0 and max_requests >= 1")
        self.host = host
        self.max_seconds = float(max_seconds)
        self.max_requests = int(max_requests)
        self.bytes_per_s = bytes_per_s
        self.chunk_bytes = int(chunk_bytes)
        self.repos: dict[str, _Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ content

    def add(self, built: Mapping[str, Any]) -> None:
        """Serve the branches of a repo laid out by ``build_offline_cache`` (its return value)."""
        repo = self.repos.setdefault(built["repo_id"], _Repo())
        for revision, info in built["revisions"].items():
            repo.refs[revision] = info["commit"]
            repo.commits[info["commit"]] = {
                name: _File(Path(meta["blob"]), meta["etag"], int(meta["size"]), bool(meta["lfs"]))
                for name, meta in info["files"].items()
            }

    def add_checkpoints(
        self,
        server_cache: str | Path,
        repo_id: str,
        revisions: Mapping[str, Path],
        **build_kwargs: Any,
    ) -> dict[str, Any]:
        """Lay out ``repo_id`` in the server's cache (``build_offline_cache``) and serve it."""
        built = build_offline_cache(Path(server_cache), repo_id, dict(revisions), **build_kwargs)
        self.add(built)
        return built

    def add_cache_dir(self, server_cache: str | Path) -> list[str]:
        """Serve every repo found in a hub cache folder (``models--org--name/refs/*``).

        Each file's etag is its blob's name, as in any huggingface_hub cache. Returns the repo ids.
        """
        added = []
        for repo_dir in sorted(Path(server_cache).glob("models--*--*")):
            _, org, name = repo_dir.name.split("--", 2)
            repo_id = f"{org}/{name}"
            repo = self.repos.setdefault(repo_id, _Repo())
            for ref in sorted((repo_dir / "refs").glob("*")):
                commit = ref.read_text().strip()
                snapshot = repo_dir / "snapshots" / commit
                files = {}
                for entry in sorted(snapshot.iterdir()):
                    blob = entry.resolve()
                    size = blob.stat().st_size
                    files[entry.name] = _File(
                        blob,
                        os.path.basename(os.readlink(entry)),
                        size,
                        is_lfs_file(entry.name, size),
                    )
                repo.refs[ref.name] = commit
                repo.commits[commit] = files
            added.append(repo_id)
        return added

    def remove_revision(self, repo_id: str, revision: str) -> None:
        """Make branch ``revision`` disappear (its commit stays reachable by hash)."""
        del self.repos[repo_id].refs[revision]

    def inject(self, fault: Fault) -> Fault:
        """Add a fault (see :class:`Fault`); returns it (its ``hits`` count what it did)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    # ------------------------------------------------------------------ observation

    def count(
        self,
        method: str | None = None,
        filename: str | None = None,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        status: int | None = None,
    ) -> int:
        """Number of logged requests matching every given field (``filename``: fnmatch pattern)."""
        return len(list(self._select(method, filename, repo_id, revision, status)))

    def _select(
        self,
        method: str | None,
        filename: str | None,
        repo_id: str | None,
        revision: str | None,
        status: int | None,
    ) -> Iterator[Request]:
        with self._lock:
            requests = list(self.requests)
        for r in requests:
            if (
                (method is None or r.method == method)
                and (filename is None or fnmatch.fnmatch(r.filename, filename))
                and (repo_id is None or r.repo_id == repo_id)
                and (revision is None or r.revision == revision)
                and (status is None or r.status == status)
            ):
                yield r

    def max_concurrency(self, method: str = "GET", filename: str | None = None) -> int:
        """Most matching requests in progress at one instant (a sweep over start/finish times)."""
        events = []
        now = time.monotonic()
        for r in self._select(method, filename, None, None, None):
            events.append((r.started, 1))
            events.append((r.finished if r.finished is not None else now, -1))
        # Finishing before starting at equal times: touching intervals do not overlap.
        events.sort(key=lambda e: (e[0], e[1]))
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        return peak

    # ------------------------------------------------------------------ serving

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, the value for ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("the fake hub is not started")
        return f"http://{self.host}:{self._server.server_port}"

    def client_env(
        self, hf_home: str | Path, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for a process that should use this hub: ``HF_ENDPOINT``, ``HF_HOME``,
        online mode, no proxies, no telemetry, no inherited ``HF_HUB_CACHE``/``HF_TOKEN``."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith("HF_")
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        return env

    @contextlib.contextmanager
    def patched_huggingface_hub(self) -> Iterator[None]:
        """Point the already-imported huggingface_hub of THIS process at the fake hub, online.

        huggingface_hub reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import; this patches the
        constants it consults at call time and restores them on exit.
        """
        import huggingface_hub.constants as hf_constants

        saved = {
            name: getattr(hf_constants, name)
            for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_OFFLINE")
        }
        saved_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE")}
        hf_constants.ENDPOINT = self.url
        hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = (
            self.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        hf_constants.HF_HUB_OFFLINE = False
        os.environ["HF_ENDPOINT"] = self.url
        os.environ["HF_HUB_OFFLINE"] = "0"
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(hf_constants, name, value)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def start(self) -> Self:
        """Serve on an ephemeral port in daemon threads; stops itself after ``max_seconds``."""
        if self._server is not None:
            raise RuntimeError("the fake hub is already started")
        server = ThreadingHTTPServer((self.host, 0), self._handler())
        server.daemon_threads = True
        self._server = server
        serve = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        self._threads = [serve, watchdog]
        serve.start()
        watchdog.start()
        return self

    def _watchdog(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stopped.wait(0.2):
            with self._lock:
                too_many = len(self.requests) >= self.max_requests
            if time.monotonic() > deadline or too_many:
                self._shutdown()
                return

    def _shutdown(self) -> None:
        server = self._server
        if server is not None and not self._stopped.is_set():
            self._stopped.set()
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        self._shutdown()
        self._stopped.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_fault(self, method: str, repo_id: str, revision: str, filename: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.take(method, repo_id, revision, filename):
                    return fault
        return None

    def _log(self, request: Request) -> Request:
        with self._lock:
            self.requests.append(request)
        return request

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._serve()

            def do_GET(self) -> None:
                self._serve()

            def _error(
                self,
                record: Request,
                status: int,
                code: str,
                commit: str | None = None,
                retry_after: float | None = None,
            ) -> None:
                record.status = status
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                if retry_after is not None:
                    self.send_header("Retry-After", f"{retry_after:g}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _serve(self) -> None:
                started = time.monotonic()
                match = _RESOLVE_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
                if not match:
                    record = hub._log(Request(self.command, "", "", self.path, started=started))
                    self._error(record, 404, "RepoNotFound")
                    record.finished = time.monotonic()
                    return
                repo_id, revision, filename = (urllib.parse.unquote(g) for g in match.groups())
                record = hub._log(
                    Request(self.command, repo_id, revision, filename, started=started)
                )
                try:
                    fault = hub._take_fault(self.command, repo_id, revision, filename)
                    record.fault = fault.kind if fault is not None else None
                    if fault is not None and fault.kind == "status":
                        return self._error(
                            record,
                            fault.status,
                            f"Injected{fault.status}",
                            retry_after=fault.retry_after,
                        )
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._error(record, 404, "RepoNotFound")
                    commit = revision if revision in repo.commits else repo.refs.get(revision)
                    if commit is None:
                        return self._error(record, 404, "RevisionNotFound")
                    entry = repo.commits[commit].get(filename)
                    if entry is None:
                        return self._error(record, 404, "EntryNotFound", commit)
                    self._send_file(record, commit, entry, fault)
                finally:
                    if record.finished is None:
                        record.finished = time.monotonic()

            def _send_file(
                self, record: Request, commit: str, entry: _File, fault: Fault | None
            ) -> None:
                size = entry.size
                first, status = 0, 200
                wanted = self.headers.get("Range")
                range_match = _RANGE.fullmatch(wanted.strip()) if wanted else None
                if range_match and self.command == "GET" and int(range_match.group(1)) < size:
                    first, status = int(range_match.group(1)), 206
                replacement = fault.body if fault is not None and fault.kind == "replace" else None
                body_size = len(replacement) if replacement is not None else size - first
                announced = body_size
                to_send = body_size
                if fault is not None and fault.kind == "short":
                    announced = to_send = body_size // 2
                elif fault is not None and fault.kind == "truncate":
                    to_send = body_size // 2
                record.status = status
                self.send_response(status)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{entry.etag}"')
                if entry.lfs:
                    self.send_header("X-Linked-Etag", f'"{entry.etag}"')
                    self.send_header("X-Linked-Size", str(size))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{size - 1}/{size}")
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                if self.command == "HEAD":
                    return
                sent = 0
                try:
                    if replacement is not None:
                        record.bytes_sent = len(replacement)
                        self.wfile.write(replacement)
                        return
                    with open(entry.path, "rb") as fh:
                        fh.seek(first)
                        while sent < to_send:  # bounded: at most to_send bytes
                            chunk = fh.read(min(hub.chunk_bytes, to_send - sent))
                            if not chunk:
                                break
                            if (
                                fault is not None
                                and fault.kind == "corrupt"
                                and sent == 0
                                and first == 0
                            ):
                                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                            if (
                                hub.bytes_per_s
                            ):  # throttle before the write: no pause after the last byte
                                _sleep(len(chunk) / hub.bytes_per_s)
                            # Counted before the write: a client that has the bytes finds them logged.
                            record.bytes_sent = sent + len(chunk)
                            if sent + len(chunk) >= to_send:
                                record.finished = time.monotonic()
                            self.wfile.write(chunk)
                            sent += len(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up; nothing to clean
                if fault is not None and fault.kind == "truncate":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(2)  # socket.SHUT_RDWR: cut the body short now

        return Handler


# --------------------------------------------------------------------------- checkpoints to serve

TINY_TEXTS = (
    "the cat sat on the mat",
    "a dog ran far away from the cat",
    "the small bird sang in the old tree",
    "we walked to the river and back again",
)


def train_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 320, texts: Iterable[str] = TINY_TEXTS
) -> Path:
    """A byte-level BPE tokenizer (Pythia's kind: GPT-NeoX fast tokenizer, ``<|endoftext|>``
    special token, no prefix space) trained on ``texts``, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(list(texts) * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_gpt_neox_config(
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 64,
) -> Any:
    """A small ``GPTNeoXConfig`` in Pythia's layout (rotary on 25% of each head's dims, untied
    LM head), with an MLP 2x as wide as the model (Pythia's is 4x) to keep files small."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=0.25,
        tie_word_embeddings=False,
    )


def tiny_gpt2_config(
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 64,
) -> Any:
    """A small ``GPT2Config`` in GPT-2's layout (learned positions, tied LM head, ``c_attn``
    Conv1D), with an MLP 2x as wide as the model (GPT-2's is 4x) and no dropout."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_hidden_layers,
        n_head=num_attention_heads,
        n_inner=2 * hidden_size,
        n_positions=max_position_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def save_random_checkpoint(
    step_dir: str | Path, config: Any, seed: int, tokenizer_dir: str | Path | None = None
) -> Path:
    """Save a randomly initialised causal LM of ``config`` (``GPTNeoXForCausalLM``, or
    ``GPT2LMHeadModel`` for a ``GPT2Config``; ``torch.manual_seed(seed)``) in the hub layout
    (``config.json`` + ``model.safetensors``), plus the tokenizer's files if given."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # the config's class picks the model's
    step_dir = Path(step_dir)
    model.save_pretrained(step_dir)
    if tokenizer_dir is not None:
        for path in Path(tokenizer_dir).iterdir():
            if path.is_file():
                shutil.copyfile(path, step_dir / path.name)
    return step_dir


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve a hub cache folder as a fake hub on 127.0.0.1."
    )
    parser.add_argument(
        "cache_dir", type=Path, help="a cache laid out by mechgen.sources.hubcache.build_offline_cache"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=900.0, help="stop after this long (default 900)"
    )
    parser.add_argument(
        "--bytes-per-s", type=float, default=None, help="throttle GET bodies to this rate"
    )
    args = parser.parse_args(argv)
    hub = FakeHub(max_seconds=args.max_seconds, bytes_per_s=args.bytes_per_s)
    repos = hub.add_cache_dir(args.cache_dir)
    if not repos:
        parser.error(f"no models--org--name folders in {args.cache_dir}")
    hub.start()
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    print(f"serving {', '.join(repos)} for at most {args.max_seconds:.0f} s", flush=True)
    try:
        hub._stopped.wait(args.max_seconds + 1)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()


if __name__ == "__main__":
    _main()
