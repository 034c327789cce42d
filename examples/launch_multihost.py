"""Starts N copies of a JAX program as one multi-process job on this machine.

Each copy gets ``--coordinator localhost:PORT --num-processes N --process-id
I --local-devices D`` ahead of the program's own arguments (those after
``--``). The launcher waits for all of them, prefixes each line of output
with the process id, and if one fails, stops the others and exits with its
status. It stands in for what a cluster scheduler does (SLURM's ``srun``,
a TPU pod's ``--worker=all``), for trying multi-host code on one CPU box::

    python examples/launch_multihost.py --num-processes 2 --local-devices 4 -- \\
        --steps 5 --mesh 2x4 --ckpt /tmp/lora_ckpt --out /tmp/summary.json
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _pump(proc, prefix: str, sink) -> None:
    for line in proc.stdout:
        sink.write(f"[{prefix}] {line}")
        sink.flush()


def launch(program_args: list[str], *, num_processes: int, local_devices: int,
           program: str = os.path.join(HERE, "multihost_train.py"), timeout: float = 3600,
           env: dict | None = None, sink=sys.stdout) -> int:
    """Runs ``program`` as ``num_processes`` cooperating processes; returns the exit status."""
    port = free_port()
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    procs, pumps = [], []
    for pid in range(num_processes):
        cmd = [sys.executable, program, "--coordinator", f"localhost:{port}",
               "--num-processes", str(num_processes), "--process-id", str(pid),
               "--local-devices", str(local_devices), *program_args]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        t = threading.Thread(target=_pump, args=(proc, f"p{pid}", sink), daemon=True)
        t.start()
        pumps.append(t)
    deadline = time.monotonic() + timeout
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0].returncode if failed else 124
                break
            time.sleep(0.2)
        else:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for p in procs:      # the processes this launcher started, and only those
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
        for p in procs:
            p.stdout.close()
    return status


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--local-devices", type=int, default=4)
    p.add_argument("--program", default=os.path.join(HERE, "multihost_train.py"))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="-- then the program's own arguments")
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    sys.exit(launch(rest, num_processes=args.num_processes, local_devices=args.local_devices,
                    program=args.program, timeout=args.timeout))


if __name__ == "__main__":
    main()
