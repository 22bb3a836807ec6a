#!/usr/bin/env python3
"""N JAX processes on this machine over loopback (CPU, gloo collectives): the multi-host code
path (per-host rollouts, one global update) without a cluster.

    launch/local_multiprocess.py NPROC --config configs/tiny_cpu.yaml [k=v ...]

Each process runs ``LAUNCH_CMD ARGS`` (default ``agentgym-jax --distributed train``) with
``JAX_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_BIND_ADDRESS`` (127.0.0.1 only: nothing listens
beyond this machine), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` and ``JAX_PLATFORMS=cpu``.

Environment: ``PORT`` (default: a free one), ``LOCAL_DEVICES`` (fake CPU devices per process;
default: XLA_FLAGS as set), ``LAUNCH_CMD``, ``LAUNCH_TIMEOUT`` (seconds; then every process is
killed). If one process fails the others are killed: a dead peer leaves them blocked in a
collective. SIGINT / SIGTERM are forwarded to every process, which stop together at the end of
the step and save (a preemption). Exit status: the first failure's, else 0.

Standard library only (no jax here), so any python3 runs it.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(i: int, n: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
    )
    if env.get("LOCAL_DEVICES"):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={env['LOCAL_DEVICES']}"
    return env


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    n, args = int(argv[0]), argv[1:]
    port = int(os.environ.get("PORT") or free_port())
    cmd = shlex.split(os.environ.get("LAUNCH_CMD", "agentgym-jax --distributed train"))
    timeout = float(os.environ.get("LAUNCH_TIMEOUT") or 0)
    procs = [subprocess.Popen(cmd + args, env=child_env(i, n, port)) for i in range(n)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    start, status = time.monotonic(), 0
    while [p.poll() for p in procs].count(None):  # poll every one: sets its returncode
        failed = [p for p in procs if p.returncode not in (None, 0)]
        late = timeout and time.monotonic() - start > timeout
        if (failed or late) and not status:
            status = failed[0].returncode if failed else 124
            why = (
                f"process {procs.index(failed[0])} exited with {status}"
                if failed
                else (f"timeout after {timeout:.0f}s")
            )
            print(f"local_multiprocess: {why}; killing the others", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if not status:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status if status >= 0 else 128 - status  # killed by signal k: 128 + k, as a shell


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
