"""SSH inside TLS (issue 17) against plain SSH and against ssh straight to the target,
side by side in one run.

Everything on 127.0.0.1, real processes, from a temporary directory:

* a private OpenSSH ``sshd``: the target ("gpu-cluster");
* a ``labrelay relay`` with its SSH port and a TLS port (a self-signed certificate for
  ``relay.test`` made with ``openssl req``, pinned by the clients); no data port, so
  every session is an SSH channel through the relay (the fast path is what a network
  that needs TLS blocks);
* two ``labrelay agent`` processes registering the same sshd: ``gpu-plain`` over a plain
  SSH link, ``gpu-tls`` over a TLS link (``-o Transport=tls``).

Workload: a user's ``ssh ... 'wc -c'`` fed ``--bytes`` from a file on stdin (the count
is checked), OpenSSH's default cipher, timed from start to exit:

* ``direct``       ssh straight to the target sshd;
* ``user_plain``   ssh with ProxyCommand ``labrelay connect ... gpu-plain`` (plain SSH to
  the relay, the agent's plain link);
* ``user_tls``     the same with ``-o Transport=tls`` (the user's session over TLS 443);
* ``agent_tls``    ssh with ProxyCommand ``labrelay connect ... gpu-tls`` (plain SSH to
  the relay, the agent's TLS link).

Within each run every variant takes its turn, the order rotated run by run. Ratios:
``user_tls ÷ direct`` and ``agent_tls ÷ user_plain`` (the issue's two), and
``user_tls ÷ user_plain`` (what TLS costs the user's session).

    python -m bench.tls_transport            # 256 MiB x 3 runs
    python -m bench.tls_transport --quick    # 64 MiB x 3 runs

Results: ``bench/results/tls-latest.json`` and ``tls-latest.md`` (overwritten), and a
line in ``bench/results/history.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.history import write_latest
from bench.procs import BenchError, find_program, free_port
from bench.report import machine_conditions
from bench.sessions import LOOPBACK, RESULTS_DIR, MiB
from bench.sshd import SshdBench, labrelay_argv, on_event, public_key

VARIANTS = ("direct", "user_plain", "user_tls", "agent_tls")
LABELS = {"direct": "ssh straight to the target",
          "user_plain": "labrelay connect, plain SSH to the relay, agent's plain link",
          "user_tls": "labrelay connect over TLS, agent's plain link",
          "agent_tls": "labrelay connect, plain SSH to the relay, agent's TLS link"}
RELAY_TOML = """\
[relay]
listen = "127.0.0.1:{ssh_port}"
state_dir = "{dir}/state"
tls_cert = "{dir}/cert.pem"
tls_key = "{dir}/key.pem"
tls_listen = "127.0.0.1:{tls_port}"

[[relay.agent]]
name = "lab_plain"
keys = ["{lab_plain}"]
services = ["gpu-plain:22"]

[[relay.agent]]
name = "lab_tls"
keys = ["{lab_tls}"]
services = ["gpu-tls:22"]

[[relay.user]]
name = "alice"
keys = ["{alice}"]
services = ["gpu-plain:22", "gpu-tls:22"]
"""


class TLSBench(SshdBench):
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__(args, workdir)
        self.ssh_port = free_port()
        self.tls_port = free_port()
        self.pin = ""
        self.relay_known = workdir / "relay_known_hosts"

    def setup(self) -> None:
        self.start_sshd()
        keys = self.user_keys("lab_plain", "lab_tls", "alice")
        openssl = find_program("openssl")
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                        "/CN=relay.test", "-addext", "subjectAltName=DNS:relay.test",
                        "-keyout", str(self.dir / "key.pem"), "-out",
                        str(self.dir / "cert.pem")], check=True, capture_output=True)
        fp = subprocess.run([openssl, "x509", "-in", str(self.dir / "cert.pem"), "-noout",
                             "-fingerprint", "-sha256"], check=True, capture_output=True,
                            text=True).stdout.strip()
        self.pin = fp.split("=", 1)[1]
        config = self.dir / "relay.toml"
        config.write_text(RELAY_TOML.format(ssh_port=self.ssh_port, tls_port=self.tls_port,
                                            dir=self.dir, **keys))
        self.start_labrelay("relay", labrelay_argv(sys.executable, "relay", "--config",
                                                   str(config)),
                            on_event("relay_listening"), "relay_listening")
        host_pub = public_key(self.dir / "state" / "ssh_host_ed25519_key.pub")
        self.relay_known.write_text(f"[{LOOPBACK}]:{self.ssh_port} {host_pub}\n"
                                    + self.known_hosts.read_text().replace(
                                        f"[{LOOPBACK}]:{self.sshd_port}", "gpu-plain") +
                                    self.known_hosts.read_text().replace(
                                        f"[{LOOPBACK}]:{self.sshd_port}", "gpu-tls"))
        for name, extra in (("plain", []), ("tls", self.tls_options())):
            self.start_labrelay(
                f"agent-{name}",
                labrelay_argv(sys.executable, "agent", "-p", str(self.ssh_port),
                              "-i", str(self.dir / f"lab_{name}_ed25519"),
                              "-o", f"UserKnownHostsFile={self.relay_known}", *extra,
                              "-R", f"gpu-{name}:22:{LOOPBACK}:{self.sshd_port}",
                              f"lab@{LOOPBACK}"),
                on_event("forward_ready"), "forward_ready")

    def tls_options(self) -> list[str]:
        return ["-o", "Transport=tls", "-o", f"TLSPort={self.tls_port}",
                "-o", "TLSServerName=relay.test", "-o", f"TLSPin={self.pin}"]

    def user_argv(self, variant: str) -> list[str]:
        ssh = [find_program("ssh"), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
               "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
        if variant == "direct":
            return [*ssh, "-o", f"UserKnownHostsFile={self.known_hosts}", "-p",
                    str(self.sshd_port), f"{self.user}@{LOOPBACK}", "wc -c"]
        service = "gpu-tls" if variant == "agent_tls" else "gpu-plain"
        extra = self.tls_options() if variant == "user_tls" else []
        proxy = " ".join([sys.executable, "-m", "relay", "connect", "-p", str(self.ssh_port),
                          "-i", str(self.dir / "alice_ed25519"),
                          "-o", f"UserKnownHostsFile={self.relay_known}", *extra,
                          f"alice@{LOOPBACK}", "%h:%p"])
        return [*ssh, "-o", f"UserKnownHostsFile={self.relay_known}",
                "-o", f"ProxyCommand={proxy}", f"{self.user}@{service}", "wc -c"]

    def session(self, variant: str, payload: Path, nbytes: int) -> float:
        with payload.open("rb") as f:
            start = time.monotonic()
            out = subprocess.run(self.user_argv(variant), stdin=f, capture_output=True,
                                 timeout=600, cwd=Path(__file__).resolve().parent.parent)
            took = time.monotonic() - start
        if out.returncode != 0 or out.stdout.decode().strip() != str(nbytes):
            raise BenchError(f"{variant}: exit {out.returncode}, stdout "
                             f"{out.stdout[:100]!r}, stderr {out.stderr.decode()[-2000:]}")
        return took


def run(args: argparse.Namespace) -> dict[str, Any]:
    nbytes = (64 if args.quick else args.mib) * MiB
    with tempfile.TemporaryDirectory(prefix="labrelay-bench-tls-") as tmp:
        workdir = Path(tmp)
        bench = TLSBench(args, workdir)
        try:
            bench.setup()
            payload = workdir / "payload.bin"
            with payload.open("wb") as f:
                f.write(os.urandom(nbytes))
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.runs):
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                for variant in order:
                    secs = bench.session(variant, payload, nbytes)
                    samples[variant].append(nbytes / secs / 1e6)
                    print(f"run {r + 1}: {variant:<11} {samples[variant][-1]:7.1f} MB/s",
                          flush=True)
        finally:
            notes = bench.cleanup()
    med = {v: statistics.median(s) for v, s in samples.items()}
    ratios = {"user_tls_over_direct": med["user_tls"] / med["direct"],
              "agent_tls_over_agent_plain": med["agent_tls"] / med["user_plain"],
              "user_tls_over_user_plain": med["user_tls"] / med["user_plain"]}
    return {
        "benchmark": "tls_transport",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": bench.commit,
        "relay_uncommitted_at_start": bench.relay_changes,
        "conditions": {**machine_conditions(sys.executable, bench.loadavg_at_start),
                       "bytes": nbytes, "runs": args.runs},
        "series": [{"path": v, "label": LABELS[v], "mb_per_s": {
            "median": med[v], "min": min(samples[v]), "max": max(samples[v])},
            "samples": samples[v]} for v in VARIANTS],
        "ratios": ratios,
        "goals": [],
        "notes": notes,
    }


def markdown(res: dict[str, Any]) -> str:
    c = res["conditions"]
    lines = [f"# SSH inside TLS ({res['date']}, {res['commit']})", "",
             f"{c['bytes'] // MiB} MiB per session, {c['runs']} runs, order rotated; "
             f"{c.get('nproc')} CPUs, load at start {c.get('loadavg_at_start')}.", "",
             "| path | MB/s median (min–max) |", "|---|---|"]
    for s in res["series"]:
        m = s["mb_per_s"]
        lines.append(f"| {s['label']} | {m['median']:.1f} ({m['min']:.1f}–{m['max']:.1f}) |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.2f}× |" for k, v in res["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB per session")
    parser.add_argument("--mib", type=int, default=256, help="MiB per session")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    res = run(args)
    text = markdown(res)
    print(text)
    if not args.no_save:
        path = write_latest(RESULTS_DIR, "tls", res, text)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
