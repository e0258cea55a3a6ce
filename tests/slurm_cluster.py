"""A real SLURM cluster on loopback for the ``slurm`` tests: munge, MariaDB + slurmdbd (so that a killed or
requeued job is accounted as such), slurmctld and two slurmd "nodes" (node1, node2) on this host.

Debian's slurm 22.05 packages, run as root without systemd, everything under one temporary folder, on free
ports. Node names do not resolve; SLURM reaches them at NodeAddr=127.0.0.1, and so does sslab (it reads
NodeAddr when a node name does not resolve). ``AuthInfo=cred_expire=10`` makes a requeued job start again
after ~10 s instead of the default 120 s. The session-scoped fixture tears every daemon it started down.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "sacct", "sacctmgr", "mariadb")


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def unavailable_reason() -> str | None:
    """Why a real cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "the SLURM tests start slurmctld/slurmd/slurmdbd/munged/mariadbd and need root"
    missing = [c for c in (*DAEMONS, *CLIENTS) if which(c) is None]
    if missing:
        return (
            f"SLURM packages are not installed (missing {', '.join(missing)}); "
            "`make install-slurm` installs them with apt-get (root)"
        )
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e .)"
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports (slurmd ports must form a range), away from DDP's 20000-39999."""
    for _ in range(200):
        base = random.randint(41000, 59000)
        if all(_free(base + i) for i in range(n)):
            return list(range(base, base + n))
    raise RuntimeError("no free ports")


class SlurmCluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{os.environ.get('PATH', '')}:{SBIN_PATH}",
        }
        self.started_munge = False
        self.mariadb: subprocess.Popen | None = None
        self.log = base / "log"

    # -- helpers ---------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr or res.stdout}")
        return res.stdout

    def wait_for(self, what: str, predicate, timeout: float = 60, every: float = 0.3) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if predicate():
                    return
            except (RuntimeError, OSError, subprocess.SubprocessError):
                pass
            time.sleep(every)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.log.glob("*")))
        raise RuntimeError(f"SLURM test cluster: timed out waiting for {what}\n{logs}")

    def job_field(self, job: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job, "-o")
        for item in out.split():
            if item.startswith(f"{field}="):
                return item.split("=", 1)[1]
        return ""

    def leftover_pids(self) -> list[Path]:
        """Job-step daemons (slurmstepd) and job processes of this cluster still alive: they carry our
        SLURM_CONF in their environment. Returned as temporary pid files for ``_kill``."""
        mine = f"SLURM_CONF={self.conf}".encode()
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if int(proc.name) != os.getpid() and mine in (proc / "environ").read_bytes().split(b"\0"):
                    pidfile = self.base / "run" / f"leftover-{proc.name}.pid"
                    pidfile.write_text(proc.name)
                    found.append(pidfile)
        return found

    # -- lifecycle -------------------------------------------------------------------------------
    def write_config(self) -> None:
        ctld, dbd, mysql, n1, n2 = free_ports(5)
        self.mysql_port, self.base_ports = mysql, (ctld, dbd, n1, n2)
        host = socket.gethostname().split(".")[0]
        for d in ("state", "log", "run", "spool/node1", "spool/node2", "mysql"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        b = self.base
        self.conf.write_text(
            f"""ClusterName=sslabtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd}
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=node[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{n1}-{n2}] CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        dbd_conf = b / "slurmdbd.conf"
        dbd_conf.write_text(
            f"""AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd}
SlurmUser=root
LogFile={b}/log/slurmdbd.log
PidFile={b}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={mysql}
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
"""
        )
        dbd_conf.chmod(0o600)

    def start(self) -> None:
        self.write_config()
        b, run = self.base, self.run
        if not Path("/run/munge/munged.pid").exists() or not _alive(Path("/run/munge/munged.pid")):
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            run("runuser", "-u", "munge", "--", which("munged"))
            self.started_munge = True
        run(
            which("mariadb-install-db"),
            f"--datadir={b}/mysql",
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            timeout=120,
        )
        sock = b / "run" / "mysql.sock"
        self.mariadb = subprocess.Popen(
            [
                which("mariadbd"),
                "--user=root",
                f"--datadir={b}/mysql",
                f"--socket={sock}",
                f"--port={self.mysql_port}",
                "--bind-address=127.0.0.1",
                f"--pid-file={b}/run/mariadb.pid",
                f"--log-error={b}/log/mariadb.err",
                "--innodb-buffer-pool-size=16M",
                "--skip-name-resolve",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.wait_for(
            "mariadb", lambda: run("mariadb-admin", "-S", str(sock), "-uroot", "ping", check=False) != ""
        )
        run(
            "mariadb",
            "-S",
            str(sock),
            "-uroot",
            "-e",
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';",
        )
        run(which("slurmdbd"))  # reads slurmdbd.conf beside $SLURM_CONF
        self.wait_for("slurmdbd", lambda: run("sacctmgr", "-n", "list", "cluster") is not None)
        run("sacctmgr", "-i", "-Q", "add", "cluster", "sslabtest", check=False)
        self.wait_for(
            "the cluster in the accounting database",
            lambda: "sslabtest" in run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"),
        )
        run(which("slurmctld"))
        run(which("slurmd"), "-N", "node1")
        run(which("slurmd"), "-N", "node2")
        self.wait_for(
            "2 idle nodes", lambda: run("sinfo", "-h", "-N", "-o", "%t").split() == ["idle", "idle"]
        )

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scancel", "--full", "-u", "root", check=False)
            with contextlib.suppress(RuntimeError):
                self.wait_for("jobs to end", lambda: not self.run("squeue", "-h", check=False).strip(), 5)
        pidfiles = [
            self.base / "run" / f"{n}.pid" for n in ("slurmd-node1", "slurmd-node2", "slurmctld", "slurmdbd")
        ]
        _kill(*pidfiles)  # all at once, then the database they write to
        _kill(self.base / "run" / "mariadb.pid")
        _kill(*self.leftover_pids(), sig=9)  # slurmstepd ignores SIGTERM
        if self.mariadb is not None:  # reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.mariadb.wait(timeout=10)
            self.mariadb = None
        if self.started_munge:
            _kill(Path("/run/munge/munged.pid"))
            self.started_munge = False


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _kill(*pidfiles: Path, timeout: float = 15, sig: int = 15) -> None:
    """Send ``sig`` (SIGTERM) to the processes named in ``pidfiles``, wait for them, SIGKILL what is left."""
    pids = []
    for f in pidfiles:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(f.read_text().split()[0])
            os.kill(pid, sig)
            pids.append(pid)
    end = time.monotonic() + timeout
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _exists(p)]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="sslab-slurm-")))
    atexit.register(cluster.stop)  # also on an interrupted session
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.base, ignore_errors=True)
