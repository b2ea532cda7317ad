"""`mlx-ltc launch`: MLX's `mlx.launch` with the two things it leaves out for a training job.

- The hosts are checked first: `mlx.launch` starts remote ranks over SSH without a timeout, so a host
  that doesn't answer makes it wait without a word (measured, MLX 0.32.4). Each host named by
  `--hosts`/`--hostfile` must answer `ssh HOST true` within a few seconds, or the job doesn't start.
- Ranks on this machine (`-n N`) listen on free ports (MLX's default port is fixed, so a second job
  on the same machine would fail to connect).
- The exit status says how the ranks ended: `mlx.launch` exits 0 whatever they did and only prints
  `[WARN] Node with rank R exited with code C`; this command exits 1 with one line naming the rank.
"""

import json
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_ltc.errors import UserError

__all__ = ["check_hosts", "free_port", "hosts_of", "run"]

LOCAL = {"127.0.0.1", "localhost", "::1"}
_FAILED = re.compile(r"\[WARN\] Node with rank (\d+) exited with code (-?\d+)")
_COLOR = re.compile(r"\x1b\[[0-9;]*m")


def _value(args: list, name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def hosts_of(launch_args: list) -> list:
    """The SSH names of the hosts `mlx.launch` would start ranks on (none for `-n N` on this machine)."""
    hostfile, hosts = _value(launch_args, "--hostfile"), _value(launch_args, "--hosts")
    if hostfile:
        try:
            entries = json.loads(Path(hostfile).read_text(encoding="utf-8"))
            names = [e["ssh"] if isinstance(e, dict) else str(e) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as e:
            shape = 'a JSON list of {"ssh": ..., "ips": [...]}'
            why = f"{e.__class__.__name__}: {e}"
            raise UserError(f"--hostfile {hostfile}: not MLX's hostfile, {shape} ({why})") from None
        return names
    return [h for h in (hosts or "").split(",") if h]


def check_hosts(hosts: list, timeout: int = 10) -> None:
    """Every remote host answers `ssh HOST true` within `timeout` seconds, or one line says which doesn't."""

    def probe(host):
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}", host, "true"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return host, "ssh is not installed"
        except subprocess.TimeoutExpired:
            return host, f"no answer within {timeout} s"
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [f"ssh exited with code {proc.returncode}"])[-1]
            return host, why
        return host, None

    remote = [h for h in dict.fromkeys(hosts) if h not in LOCAL]
    with ThreadPoolExecutor(max(1, len(remote))) as pool:
        for host, problem in pool.map(probe, remote):
            if problem:
                raise UserError(
                    f"host {host} does not answer SSH ({problem}); mlx.launch would wait for it without a word. "
                    "Check that it is on and reachable, with Remote Login on and your key in its authorized_keys"
                )


def free_port(ranks: int = 2) -> int:
    """A port P with P .. P + ranks - 1 free on this machine (the ring backend listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for extra in range(1, ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
            return port
        except OSError:
            continue
    raise UserError(f"no {ranks} consecutive free ports on this machine")


def run(launch_args: list, command: list) -> int:
    """Run `mlx.launch LAUNCH_ARGS -- mlx-ltc COMMAND`, passing its output through; raise if a rank failed."""
    if not command:
        raise UserError("give the mlx-ltc command to run after --, e.g. mlx-ltc launch -n 2 -- train --repo .")
    check_hosts(hosts_of(launch_args))
    ranks = _value(launch_args, "-n")
    if ranks and ranks.isdigit() and _value(launch_args, "--starting-port") is None:  # MLX's default port is fixed:
        launch_args = [*launch_args, "--starting-port", str(free_port(int(ranks)))]  # two local jobs would collide
    launcher = Path(sys.executable).parent / "mlx.launch"
    cli = Path(sys.executable).parent / "mlx-ltc"
    # stdin a pipe kept open: mlx.launch polls its stdin and spins on one at end of file (/dev/null, nohup)
    cmd = [str(launcher), *launch_args, "--", str(cli), *command]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed = {}

    def relay():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            found = _FAILED.search(_COLOR.sub("", line))
            if found:
                failed[int(found.group(1))] = int(found.group(2))

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    code = proc.wait()
    proc.stdin.close()
    reader.join()
    if failed:
        first = min(failed, key=lambda r: (failed[r] == -15, r))  # the launcher stops the others with SIGTERM
        raise UserError(f"rank {first} exited with code {failed[first]}: the job did not finish")
    if code:
        raise UserError(f"mlx.launch exited with code {code}")
    return 0
