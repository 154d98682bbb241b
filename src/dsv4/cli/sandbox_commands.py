"""Command-line subcommands of the sandbox area: ``dsv4 sandbox run`` and ``dsv4 sandbox probe``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dsv4.sandbox.types import LAYERS

EXIT_TIMEOUT = 124          # the exit status coreutils ``timeout`` uses for the same event


def register(subparsers: argparse._SubParsersAction) -> None:
    sandbox = subparsers.add_parser("sandbox", help="run commands in sandboxes, probe the host")
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND")

    run = commands.add_parser(
        "run", help="run one command in a new sandbox and print its output",
        description="Create a sandbox, run CMD in it, print its stdout and stderr, kill the "
                    "sandbox, and exit with the command's exit status (124 on timeout).")
    run.add_argument("--layer", choices=LAYERS, default="container",
                     help="sandbox layer (default: container)")
    run.add_argument("--image", default="host",
                     help="root image: 'host' or 'dir:/path[:/path...]' (default: host)")
    run.add_argument("--memory-mb", type=int, default=512, help="memory limit in MiB")
    run.add_argument("--cpu", type=float, default=1.0, help="CPU limit in cores")
    run.add_argument("--pids", type=int, default=256, help="max processes and threads")
    run.add_argument("--disk-mb", type=int, default=1024, help="writable layer size in MiB")
    run.add_argument("--timeout-s", type=float, default=60.0,
                     help="hard deadline of the command in seconds")
    run.add_argument("-i", "--stdin", action="store_true",
                     help="read all of this process's stdin and pass it to the command")
    run.add_argument("--state-dir", default=None,
                     help="host state directory (default: $DSV4_SANDBOX_STATE or "
                          "/var/lib/dsv4-sandbox)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...",
                     help="command and arguments, after --")
    run.set_defaults(handler=run_command)

    probe = commands.add_parser("probe", help="report which layers this host supports and why")
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    probe.set_defaults(handler=probe_command)


def run_command(args: argparse.Namespace) -> int:
    from dsv4.sandbox import ExecTimeout, Host, Sandbox

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise ValueError("no command given; put it after --, e.g. dsv4 sandbox run -- echo hi")
    host = Host(args.state_dir)
    try:
        with Sandbox.create(args.image, layer=args.layer, cpu=args.cpu,
                            memory_mb=args.memory_mb, disk_mb=args.disk_mb, pids=args.pids,
                            lifetime_s=args.timeout_s + 60, host=host) as sandbox:
            stdin = sys.stdin.buffer.read() if args.stdin else None
            try:
                result = sandbox.exec(argv, stdin=stdin, timeout_s=args.timeout_s)
            except ExecTimeout as timeout:
                _print_output(timeout.result)
                print(f"dsv4 sandbox run: command timed out after {args.timeout_s:g} s and was "
                      f"killed; raise --timeout-s if it needs longer", file=sys.stderr)
                return EXIT_TIMEOUT
            _print_output(result)
            if result.truncated:
                print("dsv4 sandbox run: output was truncated at 1 MiB per stream",
                      file=sys.stderr)
            if result.oom_killed:
                print(f"dsv4 sandbox run: a process was killed by the {args.memory_mb} MiB "
                      f"memory limit; raise --memory-mb", file=sys.stderr)
            return result.exit_code if result.exit_code is not None else 1
    finally:
        host.close()


def _print_output(result) -> None:
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()


def probe_command(args: argparse.Namespace) -> int:
    from dsv4.sandbox.probe import format_table, probe_all

    results = probe_all()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    return 0 if any(r.available for r in results) else 1
