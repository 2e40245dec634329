"""A real SLURM cluster on localhost for integration tests (munged, slurmctld, one slurmd per node).

Everything the cluster writes (config, munge key and socket, state, spool, logs, pid files, job
scripts) lives in one temp dir that is removed on exit. Daemons run in the foreground as children
of this process and are stopped by PID, so several clusters (other test sessions) can share a host.
Needs root and the Debian/Ubuntu packages ``slurm-wlm`` and ``munge`` (``tools/install_slurm.sh``).

Example::

    with LocalSlurmCluster(tmp_path, nodes=2) as cluster:
        job = cluster.submit("#!/bin/bash\\n#SBATCH --nodes=2\\nsrun hostname\\n")
        assert cluster.wait(job, timeout=60) == "COMPLETED"
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal as _signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

# A job in one of these states will not run again (our config never requeues on its own).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)

# Unix socket paths (munge, slurmstepd) must stay under 108 bytes; beyond this we use the system temp dir.
_MAX_ROOT_LEN = 60
_PR_SET_PDEATHSIG = 1
# Variables of an enclosing SLURM job (CI running on a real cluster) would leak into our jobs.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


class SlurmClusterError(RuntimeError):
    """A daemon did not start, or a SLURM client command failed."""


def _die_with_parent() -> None:
    # Runs in the forked child: if the test process is killed hard, the daemon is killed too.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, _signal.SIGTERM)


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<no {path.name}>"
    return "\n".join(text.splitlines()[-lines:]) or f"<{path.name} is empty>"


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one line of ``scontrol show ... -o`` (``Key=Value`` pairs; values may contain spaces)."""
    pairs = re.findall(r"([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", line.strip())
    return dict(pairs)


class LocalSlurmCluster:
    """Start a throwaway SLURM cluster of ``nodes`` emulated nodes on this host.

    Use as a context manager (or call :meth:`start` / :meth:`stop`). Client commands must run
    with :attr:`env`, which points ``SLURM_CONF`` at this cluster's config.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        nodes: int = 1,
        cpus_per_node: int = 2,
        *,
        partition: str = "debug",
        start_timeout: float = 30.0,
        extra_conf: str = "",
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.workdir = Path(workdir) if workdir is not None else None
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.partition = partition
        self.start_timeout = start_timeout
        self.extra_conf = extra_conf
        self.host = socket.gethostname().split(".")[0]
        self.node_names = [f"node{i + 1}" for i in range(nodes)]
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self._daemons: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._script_count = 0

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalSlurmCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def conf_path(self) -> Path:
        return self._root / "slurm.conf"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise SlurmClusterError("the cluster is not started")
        return self.root

    def start(self) -> LocalSlurmCluster:
        """Write the config, start munged, slurmctld and the slurmds, and wait until all nodes are idle."""
        if self.root is not None:
            raise SlurmClusterError("the cluster is already started")
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            if shutil.which(tool) is None:
                raise SlurmClusterError(f"{tool} not found on PATH; run tools/install_slurm.sh")
        self.root = self._make_root()
        try:
            self._write_config()
            self.env = self._client_env()
            self._start_munge()
            self._spawn(
                "slurmctld",
                ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf_path)],
                self._root / "log" / "slurmctld.log",
            )
            for node in self.node_names:
                self._spawn(
                    f"slurmd.{node}",
                    ["slurmd", "-D", "-N", node, "-f", str(self.conf_path)],
                    self._root / "log" / f"slurmd.{node}.log",
                )
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel our jobs, stop every daemon we started (by PID) and remove the temp dir. Idempotent."""
        if self.root is None:
            return
        try:
            if self._alive("slurmctld"):
                self._cancel_all_jobs()
            # slurmds first so they do not re-register; munged last, everyone above needs it.
            for name, proc, _ in reversed(self._daemons):
                if name != "munged":
                    self._terminate(proc)
            self._kill_strays()
            for name, proc, _ in self._daemons:
                if name == "munged":
                    self._terminate(proc)
        finally:
            self._daemons.clear()
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ----------------------------------------------------------------- jobs
    def submit(
        self,
        script: str | os.PathLike[str],
        *args: object,
        options: Sequence[str] = (),
    ) -> str:
        """Submit a batch script (a path, or the script's text) with ``sbatch --parsable``; return the job id.

        ``args`` go to the script, ``options`` to sbatch (they override ``#SBATCH`` lines). Jobs start in
        ``<root>/jobs``, where their default ``slurm-<id>.out`` lands too.
        """
        path = self._script_path(script)
        out = self._run(
            ["sbatch", "--parsable", *options, str(path), *map(str, args)], cwd=self._root / "jobs"
        )
        return out.strip().split(";")[0]

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """The fields of ``scontrol show job -o <id>`` as a dict (``JobState``, ``Restarts``, ``StdOut``, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)])
        return parse_scontrol_record(out.splitlines()[0])

    def job_state(self, job_id: str | int) -> str:
        """The job's current state, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``."""
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: str | int, timeout: float = 120.0, poll: float = 0.25) -> str:
        """Poll until the job reaches a terminal state and return it (``sbatch --wait`` returns ~30 s late).

        A requeued job passes through ``PENDING`` again and is waited for. Raises :class:`TimeoutError`
        with the job's record and output tail when ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            # squeue is the cheap check while the job is queued or running; scontrol has the final state.
            queued = self._run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False).strip()
            if not queued or queued in TERMINAL_STATES:
                state = self.job_state(job_id)
                if state in TERMINAL_STATES:
                    return state
            if time.monotonic() > deadline:
                info = self.job_info(job_id)
                raise TimeoutError(
                    f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                    f"(Reason={info.get('Reason')}); output tail:\n{self.output(job_id)}"
                )
            time.sleep(poll)

    def signal(self, job_id: str | int, sig: str = "USR1", *, batch: bool = False) -> None:
        """Send ``sig`` to the job's steps (``scancel --signal``); ``batch=True`` targets the batch shell instead."""
        self._run(["scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id)])

    def requeue_now(self, job_id: str | int, timeout: float = 30.0) -> None:
        """Wait until the job has been requeued (``PENDING`` with ``Restarts`` > 0), then let it start at once.

        SLURM holds a requeued job back until its old credential expires (``Reason=BeginTime``, about
        25 s with ``cred_expire=10``); ``scontrol update StartTime=now`` lifts that.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info["JobState"] == "PENDING" and int(info.get("Restarts", "0")) > 0:
                break
            if info["JobState"] in TERMINAL_STATES or time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} is {info['JobState']}, not PENDING after a requeue")
            time.sleep(0.1)
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def output(self, job_id: str | int, lines: int = 40) -> str:
        """The last ``lines`` lines of the job's stdout file (for assertion messages)."""
        try:
            stdout = self.job_info(job_id).get("StdOut", "")
        except SlurmClusterError as err:
            return f"<no job record: {err}>"
        return _tail(Path(stdout), lines) if stdout else "<no StdOut>"

    # ----------------------------------------------------------------- internals
    def _make_root(self) -> Path:
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix="slurm-", dir=self.workdir))
            if len(str(root)) <= _MAX_ROOT_LEN:
                return root
            root.rmdir()
        return Path(tempfile.mkdtemp(prefix="slurm-"))

    def _write_config(self) -> None:
        root = self._root
        for sub in ("state", "spool", "log", "run", "jobs"):
            (root / sub).mkdir(mode=0o700)
        # munged wants its socket's directory searchable by all (clients of any uid).
        (root / "munge").mkdir()
        (root / "munge").chmod(0o711)
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus_per_node} State=UNKNOWN"
            for name, port in zip(self.node_names, node_ports, strict=True)
        )
        self.conf_path.write_text(
            f"""# Written by tests/slurm/cluster.py (LocalSlurmCluster)
ClusterName=evfsamtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits for its old credential to expire (default 120 s) before it restarts.
AuthInfo=cred_expire=10,socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
# Emulated nodes may declare more CPUs than the host has.
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=5
{node_lines}
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
{self.extra_conf}
"""
        )
        (root / "plugstack.conf").write_text("")

    def _client_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def _start_munge(self) -> None:
        munge_dir = self._root / "munge"
        key = munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket_path = munge_dir / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        self._until(lambda: socket_path.exists(), "munged to create its socket", ["munged"])

    def _spawn(self, name: str, argv: list[str], log_file: Path | None = None) -> None:
        """Start a foreground daemon; its stdout/stderr go to ``log/<name>.stdout`` (munged logs only there)."""
        stdout = self._root / "log" / f"{name}.stdout"
        with open(stdout, "wb") as sink:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._daemons.append((name, proc, log_file or stdout))

    def _alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p, _ in self._daemons)

    def _until(self, ready: Callable[[], bool], what: str, names: Iterable[str]) -> None:
        """Poll ``ready()`` until true; fail fast with log tails if one of ``names`` died."""
        deadline = time.monotonic() + self.start_timeout
        watched = [(name, proc, log) for name, proc, log in self._daemons if name in set(names)]
        while not ready():
            for name, proc, log_file in watched:
                if proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with code {proc.returncode} while waiting for {what}.\n"
                        f"{self._daemon_logs(name, log_file)}"
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(self._daemon_logs(name, log) for name, _, log in watched)
                raise SlurmClusterError(
                    f"timed out after {self.start_timeout:.0f} s waiting for {what}.\n{logs}"
                )
            time.sleep(0.2)

    def _daemon_logs(self, name: str, log_file: Path) -> str:
        stdout = self._root / "log" / f"{name}.stdout"
        logs = f"--- {log_file}:\n{_tail(log_file)}"
        if log_file != stdout:
            logs += f"\n--- {stdout}:\n{_tail(stdout)}"
        return logs

    def _wait_idle(self) -> None:
        def all_idle() -> bool:
            res = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True, timeout=30
            )
            states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
            return res.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names)

        names = ["slurmctld", *(f"slurmd.{n}" for n in self.node_names)]
        self._until(all_idle, f"nodes {','.join(self.node_names)} to be idle", names)

    def _run(self, argv: list[str], *, check: bool = True, cwd: Path | None = None) -> str:
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, cwd=cwd)
        if check and res.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(argv)} failed with code {res.returncode}: {res.stderr.strip() or res.stdout.strip()}"
            )
        return res.stdout

    def _script_path(self, script: str | os.PathLike[str]) -> Path:
        if isinstance(script, os.PathLike) or ("\n" not in script and Path(script).is_file()):
            return Path(script).resolve()
        self._script_count += 1
        path = self._root / "jobs" / f"script-{self._script_count}.sh"
        path.write_text(script)
        path.chmod(0o755)
        return path

    def _cancel_all_jobs(self) -> None:
        ids = self._run(["squeue", "-h", "-o", "%i"], check=False).split()
        if not ids:
            return
        self._run(["scancel", *ids], check=False)
        deadline = time.monotonic() + 15
        while self._run(["squeue", "-h", "-o", "%i"], check=False).split() and time.monotonic() < deadline:
            time.sleep(0.2)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def _kill_strays(self) -> None:
        """Kill slurmstepd and job processes of this cluster: those whose environment has our SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf_path}".encode()
        keep = {os.getpid(), os.getppid()}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in keep:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                try:
                    os.kill(int(entry.name), _signal.SIGKILL)
                except ProcessLookupError:
                    pass
