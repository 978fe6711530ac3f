"""Real engines for the tests, started once per pytest session and torn down at its end.

- :func:`start_postgres`: a throw-away PostgreSQL cluster on loopback (databases made on demand);
- :func:`start_slurm`: a single-host Slurm cluster: munged, MariaDB, slurmdbd (``sacct`` reads job
  states from it, and submitit reads them with ``sacct``), slurmctld and slurmd with this machine's
  CPUs, every file in a temporary folder, every daemon on loopback;
- :func:`start_mlflow`: ``mlflow server`` on loopback with a PostgreSQL backend store and a local
  artifact root.

Each returns an object whose ``stop()`` ends what it started, or raises :class:`Missing` with the
reason when a system package is absent (the fixtures in tests/conftest.py turn that into a skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar


class Missing(RuntimeError):
    """A system package a real engine needs is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ok, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_pid(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Signal one daemon by its process id and wait until it is gone (SIGKILL after ``timeout``)."""
    if not pid:
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it when it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
@dataclass
class Postgres:
    bindir: Path
    base: Path
    port: int
    prefix: list[str]

    def url(self, db: str) -> str:
        return f"postgresql://dmkd@127.0.0.1:{self.port}/{db}"

    def create_db(self, db: str) -> str:
        subprocess.run(self.prefix + [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                      "dmkd", db], check=True, capture_output=True)
        return self.url(db)

    def stop(self) -> None:
        subprocess.run(self.prefix + [str(self.bindir / "pg_ctl"), "-D", str(self.base / "pgdata"), "-m", "fast",
                                      "stop"], capture_output=True, check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres() -> Postgres:
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    if not bindirs:
        raise Missing("PostgreSQL server not installed (apt-get install postgresql; CI installs it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Missing("psycopg missing (pip install psycopg[binary]; part of [dev])") from None
    bindir = bindirs[-1]
    base = Path(tempfile.mkdtemp(prefix="dmkd-pg-"))
    data = base / "pgdata"
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            raise Missing("running as root without runuser")
        prefix = ["runuser", "-u", "postgres", "--"]
        os.chmod(base, 0o777)
        data.mkdir()
        shutil.chown(data, "postgres")
    sock = base / "sock"
    sock.mkdir()
    os.chmod(sock, 0o777)
    port = free_port()
    subprocess.run(prefix + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "dmkd"], check=True,
                   capture_output=True)
    subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w", "-o",
                             f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200",
                             "start"], check=True, capture_output=True)
    return Postgres(bindir, base, port, prefix)


# ---------------------------------------------------------------------------------------------
# Slurm: munge, MariaDB, slurmdbd, slurmctld, slurmd
# ---------------------------------------------------------------------------------------------
SLURM_BINARIES = ("munged", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld",
                  "slurmd", "sacctmgr", "sinfo", "sbatch", "sacct", "squeue", "scancel", "srun")


@dataclass
class Slurm:
    """A running single-host cluster. ``env`` holds what a client needs (SLURM_CONF)."""

    base: Path
    conf: Path
    node: str
    cpus: int
    partition: str
    pids: dict[str, int | None] = field(default_factory=dict)
    munge_socket: Path | None = None
    db_port: int = 0
    dbd_port: int = 0
    ctld_port: int = 0
    slurmd_port: int = 0

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> str:
        p = subprocess.run(list(cmd), env=dict(os.environ, **self.env), capture_output=True, text=True,
                           timeout=60, check=False)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}: {p.stderr.strip()[-500:]}")
        return p.stdout

    PIDFILES: ClassVar[dict[str, str]] = {"slurmd": "slurmd.pid", "slurmctld": "slurmctld.pid", "slurmdbd": "slurmdbd.pid",
                "mariadbd": "mysql.pid", "munged": "munge/munged.pid"}

    def stop(self) -> None:
        # Jobs first, then the daemons in the reverse order of their start.
        if self.ctld_port:
            self.run("scancel", "--full", "--user", "root", check=False)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            _stop_pid(self.pids.get(name) or _pidfile(self.base / self.PIDFILES[name]))
        shutil.rmtree(self.base, ignore_errors=True)

    def note_pid(self, name: str) -> None:
        """Wait for a daemon's pid file (written once it has forked) and remember its process id."""
        path = self.base / self.PIDFILES[name]
        _wait(f"{name}'s pid file", lambda: _pidfile(path) is not None, 60, self.base / "log" / f"{name}.log")
        self.pids[name] = _pidfile(path)


def _missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def start_slurm(cpus: int | None = None) -> Slurm:
    """Start a one-node cluster named after this host, with ``cpus`` (default: this machine's) CPUs."""
    missing = _missing_binaries()
    if missing:
        raise Missing(f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm slurmdbd "
                      "munge mariadb-server; CI installs them)")
    if os.geteuid() != 0:
        raise Missing("the test Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    cpus = cpus or os.cpu_count() or 1
    node = socket.gethostname().split(".")[0]
    base = Path(tempfile.mkdtemp(prefix="dmkd-slurm-"))
    os.chmod(base, 0o755)  # munged refuses keys and sockets in folders others may write
    for sub in ("state", "spool", "mysql", "log", "munge"):
        (base / sub).mkdir()
    os.chmod(base / "munge", 0o700)
    cluster = Slurm(base, base / "slurm.conf", node, cpus, "debug")
    try:
        _start_munge(cluster)
        _start_mariadb(cluster)
        _write_confs(cluster)
        _start_slurmdbd(cluster)
        _start_controller_and_node(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_munge(c: Slurm) -> None:
    key, sock = c.base / "munge" / "munge.key", c.base / "munge" / "munge.socket"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    os.chmod(key, 0o400)
    subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={c.base / 'munge' / 'munged.pid'}", f"--log-file={c.base / 'log' / 'munged.log'}",
                    f"--seed-file={c.base / 'munge' / 'munged.seed'}"], check=True, capture_output=True)
    c.note_pid("munged")
    c.munge_socket = sock


def _start_mariadb(c: Slurm) -> None:
    data, sock = c.base / "mysql", c.base / "mysql.sock"
    c.db_port = free_port()
    subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)
    log = c.base / "log" / "mariadb.log"
    subprocess.Popen([_which("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                      f"--port={c.db_port}", "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
                      f"--pid-file={c.base / 'mysql.pid'}", f"--log-error={log}", "--innodb-buffer-pool-size=32M",
                      "--innodb-log-file-size=16M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    _wait("MariaDB", lambda: sock.exists() and _port_open(c.db_port), 60, log)
    c.note_pid("mariadbd")
    grant = ("CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
             "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
    subprocess.run([_which("mariadb"), "--no-defaults", f"--socket={sock}", "-uroot", "-e", grant], check=True,
                   capture_output=True)


def _write_confs(c: Slurm) -> None:
    c.ctld_port, c.slurmd_port, c.dbd_port = free_port(), free_port(), free_port()
    b, auth = c.base, f"AuthInfo=socket={c.munge_socket}"
    c.conf.write_text(f"""\
ClusterName=dmkdtest
SlurmctldHost={c.node}(127.0.0.1)
SlurmctldPort={c.ctld_port}
SlurmdPort={c.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{auth}
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.pid'}
SlurmctldLogFile={b / 'log' / 'slurmctld.log'}
SlurmdLogFile={b / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={c.dbd_port}
AccountingStoragePass={c.munge_socket}
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName={c.node} NodeAddr=127.0.0.1 CPUs={c.cpus} State=UNKNOWN
PartitionName={c.partition} Nodes={c.node} Default=YES MaxTime=INFINITE State=UP
""")
    dbd = b / "slurmdbd.conf"  # read from the folder of SLURM_CONF
    dbd.write_text(f"""\
AuthType=auth/munge
{auth}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={c.dbd_port}
SlurmUser=root
PidFile={b / 'slurmdbd.pid'}
LogFile={b / 'log' / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={c.db_port}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
""")
    os.chmod(dbd, 0o600)


def _daemon(c: Slurm, name: str, *args: str) -> None:
    subprocess.run([_which(name), *args], env=dict(os.environ, **c.env), check=True, capture_output=True,
                   timeout=60)


def _start_slurmdbd(c: Slurm) -> None:
    _daemon(c, "slurmdbd")
    _wait("slurmdbd", lambda: _port_open(c.dbd_port), 60, c.base / "log" / "slurmdbd.log")
    c.note_pid("slurmdbd")
    c.run("sacctmgr", "-i", "add", "cluster", "dmkdtest")


def _start_controller_and_node(c: Slurm) -> None:
    _daemon(c, "slurmctld", "-f", str(c.conf))
    _wait("slurmctld", lambda: _port_open(c.ctld_port), 60, c.base / "log" / "slurmctld.log")
    c.note_pid("slurmctld")
    _daemon(c, "slurmd", "-f", str(c.conf), "-N", c.node)
    c.note_pid("slurmd")

    def idle() -> bool:
        out = c.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
        return out[-1:] == ["idle"] if out else False

    _wait("the Slurm node (sinfo: idle)", idle, 90, c.base / "log" / "slurmd.log")


# ---------------------------------------------------------------------------------------------
# MLflow tracking server
# ---------------------------------------------------------------------------------------------
@dataclass
class MlflowServer:
    backend: str
    artifacts: Path
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", self.backend, "--artifacts-destination", str(self.artifacts),
               "--workers", "1"]
        # Without the server's job runner (eight worker processes for GenAI scorers the harness never uses).
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait("mlflow server", healthy, 300, self.log)

    def stop(self) -> None:
        """Stop the server and every process it started (its web workers are in its session)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 30
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)


def start_mlflow(backend: str, base: Path) -> MlflowServer:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise Missing("mlflow is not installed (part of the project's dependencies)") from None
    (base / "artifacts").mkdir(parents=True, exist_ok=True)
    server = MlflowServer(backend, base / "artifacts", free_port(), base / "mlflow-server.log")
    server.start()
    return server
