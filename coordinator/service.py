"""``fedtune coordinator``: the federation's server on a real network.

Starts a Flower SuperLink (deployment mode: agents' SuperNodes connect to it) with TLS
and SuperNode authentication, registers the authorized agent keys, and submits
fedtune's app with the run's config, exactly as ``fedtune simulate`` does; the
ServerApp waits for ``federation.min_clients`` agents and writes the same run
directory; ``--resume`` continues after the last checkpoint.

Who can reach what: agents (and anyone holding the CA) reach only the Fleet API on
``--address`` (coordinator/superlink_main.py, coordinator/fleet_guard.py), with a message
capped at ``federation.max_message_mb``; the Control and Runtime APIs listen on loopback, for this
process's own ``flwr`` CLI and the ServerApp. Each agent key is registered under its
file's stem (``NAME.pub``), the name the ServerApp binds to that agent's node. The
SuperLink keeps its state in memory: nothing an agent sends outlives the run on disk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedtune.coordinator.superlink import SuperLink, Tls, log_and_echo
from fedtune.core.config import Config
from fedtune.core.errors import UserError
from fedtune.core.rundir import RunDir
from fedtune.core.security import CA_CERT, SERVER_CERT, SERVER_KEY, public_key_files

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
        tls = Tls(*(f.resolve() for f in files))
        check_loopback_name(tls.server_cert)
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


def check_loopback_name(server_cert: Path) -> None:
    """The coordinator's own tools reach its SuperLink on 127.0.0.1: its certificate must name it."""
    certificate = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is None or ipaddress.ip_address("127.0.0.1") not in names.get_values_for_type(x509.IPAddress):
        raise UserError(
            f"{server_cert}: the server certificate must also name 127.0.0.1 (the coordinator reaches its own "
            "Control API on loopback); fedtune certs always adds it"
        )


def run_coordinator(config: Config, run: RunDir, settings: CoordinatorSettings, echo=print) -> dict:
    host, port = parse_address(settings.address)
    tls, keys = security(settings)
    if settings.insecure:
        echo("fedtune: WARNING: --insecure: agents connect over plain text" + ("" if keys else ", unauthenticated"))
    extra = ["--enable-supernode-auth"] if keys else []
    log_path = run.logs / "flower.log"
    link = SuperLink(
        simulation=False,
        host=host,
        port=port,
        tls=tls,
        extra_args=extra,
        log_file=run.logs / "superlink.log",
        max_message_bytes=int(config.federation.max_message_mb * 2**20),
    )
    with open(log_path, "a") as log, link:
        for key in keys:
            link.register(key, name=key.stem)
        echo(
            f"fedtune: coordinator on {host}:{port} ({'TLS' if tls else 'plain text'}, "
            f"{len(keys)} authorized agent keys); waiting for {config.federation.min_clients} agents"
        )
        identity = "registered" if keys else "claimed"
        run_config = {"fedtune-config": config.to_yaml(), "run-dir": str(run.path), "agent-identity": identity}
        link.submit(run_config, None, log_and_echo(log, echo))
    try:
        return run.summary()
    except UserError:
        raise UserError(
            f"the run did not finish; see {log_path} (resume with fedtune coordinator --resume {run.path})"
        ) from None
