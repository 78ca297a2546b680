"""A throwaway Postgres cluster of the tests' own, for tests that stop, kill or restart the server.

The shared cluster (15/main) must never be stopped by a test: other suites use it at the same time. A
ScratchCluster is initdb'd into a temporary folder, listens on its own port (socket in that folder) and
is removed at the end. Postgres refuses to run as root, so the server runs as the `postgres` OS user; the
OS user running the tests gets a superuser role of the same name and peer auth over the socket, as on
the shared cluster. The extension comes from the system Postgres directories (make install).
"""

import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psycopg

PGBIN = subprocess.run(["/usr/lib/postgresql/15/bin/pg_config", "--bindir"], capture_output=True, text=True,
                       check=True).stdout.strip()
USER = getpass.getuser()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args, **kw):
    """Runs a server binary as the postgres OS user (directly when the tests already run as it)."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--"] + args
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


class ScratchCluster:
    def __init__(self, dbname="herald_scratch"):
        self.dir = tempfile.mkdtemp(prefix="herald-cluster-")
        os.chmod(self.dir, 0o755)
        self.data = os.path.join(self.dir, "data")
        self.socket_dir = self.dir
        self.log = os.path.join(self.dir, "server.log")
        self.port = _free_port()
        self.dbname = dbname
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            os.chown(self.dir, pg.pw_uid, pg.pw_gid)
        _as_postgres([f"{PGBIN}/initdb", "-D", self.data, "-A", "peer", "--auth-host=scram-sha-256",
                      "-U", "postgres", "--no-sync"])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    "fsync = on\nmax_connections = 60\nshared_buffers = 64MB\n")
        # peer auth maps the OS user to the role of the same name
        self.start()
        if USER != "postgres":
            self.admin_sql(f'CREATE ROLE "{USER}" SUPERUSER LOGIN')
        self.admin_sql(f'CREATE DATABASE "{dbname}" OWNER "{USER}"')

    # ----------------------------------------------------------------------------------------- server

    def start(self, timeout=30):
        _as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", str(timeout), "start"])

    def stop(self, mode="fast"):
        """Stops the server (mode: smart | fast | immediate); a no-op when it is not running."""
        if self.running():
            _as_postgres([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"])

    def postmaster_pid(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                return int(f.readline().strip())
        except (FileNotFoundError, ValueError):
            return None

    def running(self):
        pid = self.postmaster_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill9(self):
        """A hard crash: SIGKILL to the postmaster and to every backend of it at once (as a power cut
        would), so the next start runs crash recovery from the WAL."""
        postmaster = self.postmaster_pid()
        assert postmaster, "the scratch cluster is not running"
        for pid in self._processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        # until the postmaster is reaped too: a new one refuses to start while the old pid exists
        while self._processes() or os.path.exists(f"/proc/{postmaster}"):
            if time.monotonic() > deadline:
                raise AssertionError("processes of the killed cluster did not go away")
            time.sleep(0.05)

    def _processes(self):
        """The postmaster and its children: every process whose working directory is our data folder
        (Postgres chdirs there at start, and its children inherit it)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/cwd") == self.data:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def destroy(self):
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ clients

    @property
    def url(self):
        """libpq keyword form, for DATABASE_URL of `herald` and for psycopg."""
        return f"host={self.socket_dir} port={self.port} dbname={self.dbname} user={USER}"

    def connect(self, dbname=None, **kw):
        return psycopg.connect(host=self.socket_dir, port=self.port, dbname=dbname or self.dbname, user=USER,
                               autocommit=True, **kw)

    def admin_sql(self, sql):
        _as_postgres([f"{PGBIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                      "-p", str(self.port), "-d", "postgres", "-c", sql])
