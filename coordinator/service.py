"""``fedtune coordinator``: the federation's server on a real network.

Starts a Flower SuperLink (deployment mode: agents' SuperNodes connect to it) with TLS
and SuperNode authentication, registers the authorized agent keys, and submits
fedtune's app with the run's config, exactly as ``fedtune simulate`` does; the
ServerApp waits for ``federation.min_clients`` agents and writes the same run
directory. The SuperLink keeps its state (registered keys) in ``logs/superlink.db``,
so ``--resume`` restarts on the same state and continues after the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.superlink import SuperLink, Tls, log_and_echo
from fedtune.config import Config
from fedtune.errors import UserError
from fedtune.rundir import RunDir
from fedtune.security import CA_CERT, SERVER_CERT, SERVER_KEY, public_key_files

DEFAULT_PORT = 9092


@dataclass
class CoordinatorSettings:
    address: str
    certs: Path | None
    authorized_keys: Path | None
    insecure: bool


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address {address!r}: expected HOST:PORT, e.g. 0.0.0.0:{DEFAULT_PORT}")
    return host.strip("[]"), int(port)


def security(settings: CoordinatorSettings) -> tuple[Tls | None, list[Path]]:
    """TLS files and authorized keys; both required unless --insecure."""
    tls = None
    if settings.certs:
        files = [settings.certs / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"--certs {settings.certs}: missing {', '.join(missing)} (make them with fedtune certs DIR)"
            )
        tls = Tls(*files)
    elif not settings.insecure:
        raise UserError(
            "TLS is on by default: pass --certs DIR (make one with fedtune certs DIR --host HOSTNAME), "
            "or --insecure for a plain-text try-out"
        )
    keys = public_key_files(settings.authorized_keys) if settings.authorized_keys else []
    if not keys and not settings.insecure:
        raise UserError(
            "agent authentication is on by default: pass --authorized-keys FILE_OR_DIR with the agents' "
            "public keys (fedtune keygen), or --insecure"
        )
    return tls, keys


def run_coordinator(config: Config, run: RunDir, settings: CoordinatorSettings, echo=print) -> dict:
    host, port = parse_address(settings.address)
    tls, keys = security(settings)
    if settings.insecure:
        echo("fedtune: WARNING: --insecure: agents connect over plain text" + ("" if keys else ", unauthenticated"))
    extra = ["--database", str(run.logs / "superlink.db")] + (["--enable-supernode-auth"] if keys else [])
    log_path = run.logs / "flower.log"
    with (
        open(log_path, "a") as log,
        SuperLink(
            simulation=False, host=host, port=port, tls=tls, extra_args=extra, log_file=run.logs / "superlink.log"
        ) as link,
    ):
        for key in keys:
            link.register(key)
        echo(
            f"fedtune: coordinator on {host}:{port} ({'TLS' if tls else 'plain text'}, "
            f"{len(keys)} authorized agent keys); waiting for {config.federation.min_clients} agents"
        )
        link.submit({"fedtune-config": config.to_yaml(), "run-dir": str(run.path)}, None, log_and_echo(log, echo))
    try:
        return run.summary()
    except UserError:
        raise UserError(
            f"the run did not finish; see {log_path} (resume with fedtune coordinator --resume {run.path})"
        ) from None
