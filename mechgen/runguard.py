"""A run's jobs never outlive it unnoticed: mechgen.sh starts Snakemake through this module.

Snakemake runs a local job as a child process (``python script.py``). When Snakemake itself is
killed with SIGKILL it cannot stop them: they are re-parented to PID 1 and keep writing into the
run's outputs while a ``resume`` starts the same jobs again. So:

* ``python -m mechgen.runguard exec -- snakemake ...`` starts the command in a new session
  (``setsid``: its own process group, whose id is the head's pid) with ``MECHGEN_RUN_ID=<uuid>``
  in its environment, which every job inherits. It records the head's pid, the session id, the
  run id and the command in :data:`STATE_FILE`, forwards SIGINT/SIGTERM/SIGHUP to the whole
  group (the new session is not the terminal's foreground group, so Ctrl-C must be passed on),
  and when the head ends - normally, by an error, or killed - stops whatever of the run is still
  alive (SIGTERM, then SIGKILL after :data:`GRACE_S` seconds), naming each process, then removes
  the state file.
* ``python -m mechgen.runguard stop`` (mechgen.sh calls it before ``run`` and ``resume``) covers
  the case where this supervisor was killed too: it reads the state file and finds the processes
  of that run still alive. If the head itself is alive, the run is still going: it refuses (exit
  status 3) and names the head. Otherwise it stops the survivors with a message naming them.

A process belongs to the recorded run if its environment holds ``MECHGEN_RUN_ID=<run id>``, or
(for a job that cleared its environment) it is in the run's session and started after the head.
Linux reads ``/proc``; elsewhere ``ps`` lists the run's process group. SLURM jobs of a dead head
are not local processes: ``stop`` lists this user's jobs whose working directory is this one
(``squeue``) and refuses while any is queued or running (see docs/cluster.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = Path(".snakemake") / "mechgen-run.json"
"""The run-state file, relative to the working directory (Snakemake's own metadata folder)."""
RUN_ID_ENV = "MECHGEN_RUN_ID"
"""The environment variable that tags every process of one supervised run."""
GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL when stopping survivors."""
EXIT_RUN_ALIVE = 3
"""Exit status of ``stop`` when the recorded run's head is still running."""

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Proc:
    """One live process: pid, session id, process-group id, start time (clock ticks after
    boot; 0 where unknown) and command line."""

    pid: int
    sid: int
    pgid: int
    start: int
    args: str


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, sid, start ticks) from /proc/<pid>/stat, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def _proc_args(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _has_tag(pid: int, run_id: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # another user's process, or gone
        return False
    return f"{RUN_ID_ENV}={run_id}".encode() in env.split(b"\0")


def find_run_processes(run_id: str, sid: int, head_start: int = 0) -> list[Proc]:
    """The live (non-zombie) processes of the run ``run_id`` whose session was ``sid``.

    This process is never included.
    """
    me = os.getpid()
    found = []
    if Path("/proc/self/stat").exists():
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            pid = int(entry.name)
            stat = _proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                continue
            state, pgid, psid, start = stat
            if _has_tag(pid, run_id) or (psid == sid and start >= head_start):
                found.append(Proc(pid, psid, pgid, start, _proc_args(pid)))
        return sorted(found, key=lambda p: p.pid)
    # No /proc (macOS, BSD): the run's process group, from ps.
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,pgid=,stat=,command="], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        pid, pgid, state, args = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if pid != me and pgid == sid and not state.startswith("Z"):
            found.append(Proc(pid, sid, pgid, 0, args))
    return sorted(found, key=lambda p: p.pid)


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(procs: list[Proc]) -> str:
    return "\n".join(f"  pid {p.pid}: {p.args[:200]}" for p in procs)


def stop_processes(procs: list[Proc], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every process, SIGKILL those alive after ``grace_s``; return the pids killed."""
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p.pid) for p in procs):
        time.sleep(0.1)
    killed = []
    for p in procs:
        if _alive(p.pid):
            try:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p.pid) for p in procs):
        time.sleep(0.05)
    return killed


def _say(message: str) -> None:
    print(f"mechgen: {message}", file=sys.stderr, flush=True)


def read_state(path: Path = STATE_FILE) -> dict | None:
    """The recorded run, or None when there is none (or the file is unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)


def _stop_survivors(state: dict, why: str, grace_s: float) -> None:
    survivors = find_run_processes(state["run_id"], state["sid"], state.get("head_start", 0))
    if not survivors:
        return
    _say(
        f"{why}; stopping its {len(survivors)} process(es) still running "
        f"(SIGTERM, SIGKILL after {grace_s:g} s):\n{_describe(survivors)}"
    )
    killed = stop_processes(survivors, grace_s)
    if killed:
        _say(f"killed with SIGKILL: {', '.join(map(str, killed))}")
    left = [p for p in survivors if _alive(p.pid)]
    if left:
        _say(f"could not stop:\n{_describe(left)}")


def slurm_jobs_here(workdir: Path | None = None) -> list[tuple[str, str, str]]:
    """``(job id, name, comment)`` of this user's queued or running SLURM jobs whose working
    directory is ``workdir`` (default: the current one); empty without ``squeue``.

    The SLURM executor submits every job with ``-D <workdir>``, the run's UUID as job name and
    ``rule_<rule>_wildcards_<...>`` as comment.
    """
    if shutil.which("squeue") is None:
        return []
    here = (workdir or Path.cwd()).resolve()
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid())
    try:
        out = subprocess.run(
            ["squeue", "-u", user, "--noheader", "-o", "%i|%j|%k|%Z"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        _say("squeue failed; cannot check for SLURM jobs of an earlier run")
        return []
    jobs = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and Path(parts[3]).resolve() == here:
            jobs.append((parts[0], parts[1], parts[2]))
    return jobs


def stop(path: Path = STATE_FILE, grace_s: float = GRACE_S) -> int:
    """Before a new run: stop what is left of the recorded run; refuse if its head is alive, or
    if SLURM jobs of this working directory are still queued or running (they are not local
    processes; the user decides whether to cancel them, see docs/cluster.md).

    Returns 0 (nothing left, or all stopped) or :data:`EXIT_RUN_ALIVE`.
    """
    state = read_state(path)
    if state is None:
        return _refuse_slurm_leftovers()
    head = state["head_pid"]
    if _alive(head) and (_has_tag(head, state["run_id"]) or not Path("/proc/self").exists()):
        _say(
            f"the run started {state['started']} is still running: pid {head} "
            f"({' '.join(state['command'])[:200]}).\n"
            f"Wait for it, or stop it with `kill -INT -- -{state['sid']}` (its whole process "
            "group), then run this again."
        )
        return EXIT_RUN_ALIVE
    _stop_survivors(
        state,
        f"the run started {state['started']} (head pid {head}) ended without stopping its jobs",
        grace_s,
    )
    if find_run_processes(state["run_id"], state["sid"], state.get("head_start", 0)):
        return EXIT_RUN_ALIVE
    path.unlink(missing_ok=True)
    return _refuse_slurm_leftovers()


def _refuse_slurm_leftovers() -> int:
    jobs = slurm_jobs_here()
    if not jobs:
        return 0
    listing = "\n".join(f"  job {i} ({name}, {comment})" for i, name, comment in jobs)
    _say(
        f"{len(jobs)} SLURM job(s) of this checkout are still queued or running, with no "
        f"Snakemake process left to wait for them:\n{listing}\n"
        "A new run would submit the unfinished ones again while these still write. Cancel them "
        f"(`scancel {' '.join(i for i, _, _ in jobs)}`) or wait until they end, then run this "
        "again (docs/cluster.md, 'When the head dies')."
    )
    return EXIT_RUN_ALIVE


def run_supervised(command: list[str], path: Path = STATE_FILE, grace_s: float = GRACE_S) -> int:
    """Run ``command`` in its own session, tagged and recorded; stop its leftovers at the end.

    Returns the command's exit status (128 + signal number if a signal ended it).
    """
    run_id = uuid.uuid4().hex
    env = dict(os.environ, **{RUN_ID_ENV: run_id})
    head = subprocess.Popen(command, env=env, start_new_session=True)
    stat = _proc_stat(head.pid)
    state = {
        "run_id": run_id,
        "head_pid": head.pid,
        "sid": head.pid,  # setsid makes the head its session's and process group's leader
        "head_start": stat[3] if stat else 0,
        "supervisor_pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cwd": os.getcwd(),
        "command": command,
    }
    _write_state(state, path)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(head.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        returncode = head.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = f"{Path(command[0]).name} (pid {head.pid}) was ended by {name}"
        returncode = 128 - returncode
    else:
        why = f"{Path(command[0]).name} (pid {head.pid}) exited with status {returncode}"
    _stop_survivors(state, why, grace_s)
    if not find_run_processes(run_id, head.pid, state["head_start"]):
        path.unlink(missing_ok=True)
    return returncode


# Snakemake options after which no job runs (listing, graphs, dry run, help, ...): mechgen.sh
# runs Snakemake once with them, unsupervised, and builds no report.
_NO_JOB_LONG = {
    "--dry-run", "--dryrun", "--help", "--version", "--list-rules", "--list", "--list-target-rules",
    "--lt", "--dag", "--rulegraph", "--filegraph", "--d3dag", "--summary", "--detailed-summary",
    "--lint", "--list-changes", "--lc", "--list-input-changes", "--li", "--list-params-changes",
    "--lp", "--list-untracked", "--lu", "--print-compilation", "--containerize", "--export-cwl",
    "--archive", "--generate-unit-tests", "--report", "--unlock", "--cleanup-metadata",
    "--cleanup-shadow", "--delete-all-output", "--delete-temp-output", "--touch",
    "--list-conda-envs", "--conda-create-envs-only", "--conda-cleanup-envs",
}  # fmt: skip
_NO_JOB_SHORT = set("nhlStD")
"""Short flags: -n dry run, -h help, -l list, -S summary, -t touch, -D detailed summary."""


def runs_jobs(args: list[str]) -> bool:
    """False if Snakemake given ``args`` would run no job (a dry run, --help, a listing, ...).

    Short flags may be bundled (``-np``); a bundle with a digit (``-c4``) is an option with its
    value. ``--`` ends the options.
    """
    for arg in args:
        if arg == "--":
            break
        if arg.split("=", 1)[0] in _NO_JOB_LONG:
            return False
        short_flags = arg.startswith("-") and not arg.startswith("--") and arg[1:].isalpha()
        if short_flags and set(arg[1:]) & _NO_JOB_SHORT:
            return False
    return True


USAGE = "usage: python -m mechgen.runguard {exec -- COMMAND... | stop | runs-jobs [ARGS...]}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["exec"]:
        command = argv[1:]
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            print(USAGE, file=sys.stderr)
            return 2
        return run_supervised(command)
    if argv == ["stop"]:
        return stop()
    if argv[:1] == ["runs-jobs"]:
        return 0 if runs_jobs(argv[1:]) else 1
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
