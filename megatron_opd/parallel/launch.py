"""``torchrun`` whose rendezvous store listens on one address: loopback on one node, the master's address on many.

Why it exists: torch's static rendezvous (``--master_addr/--master_port``) starts its TCPStore listening on every
interface (``*:PORT``), and neither torchrun's arguments nor its environment can change that. A TCPStore does
take an already bound listening socket (``master_listen_fd``), so this launcher registers a rendezvous backend,
``opd-static``, that is torch's static one with the store on such a socket, then runs torchrun's own ``main``.
On one node it also points gloo and NCCL at the loopback interface (``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME``, unless already set), so every socket of the run listens on 127.0.0.1.

    python -m megatron_opd.parallel.launch --nnodes 1 --nproc_per_node 2 \
        --rdzv-backend opd-static --rdzv-endpoint 127.0.0.1:29500 --rdzv-conf rank=0 \
        -m megatron_opd.training.main --config run.yaml

``examples/pretrain_opd.sh`` builds this command line. Every other torchrun argument works as usual.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import sys
from typing import cast

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.api import RendezvousInfo, RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

BACKEND = "opd-static"
LOOPBACK = "127.0.0.1"


def listening_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound to ``address:port`` (a name or an IP) and listening; port 0 picks a free one."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def bound_tcp_store(address: str, port: int, world_size: int | None, timeout: datetime.timedelta) -> TCPStore:
    """The master ``TCPStore`` listening on ``address:port`` only (not on every interface)."""
    sock = listening_socket(address, port)
    store = TCPStore(
        address,
        sock.getsockname()[1],
        world_size,
        True,
        timeout,
        multi_tenant=True,
        master_listen_fd=sock.fileno(),
    )
    sock.detach()  # the store owns (and closes) the descriptor now
    return store


class BoundStaticRendezvous(StaticTCPRendezvous):
    """torch's static rendezvous; node 0's store listens on ``bind_addr`` only, and workers connect there."""

    def __init__(self, bind_addr: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bind_addr = bind_addr

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            if self.rank == 0:
                self._store = bound_tcp_store(self.bind_addr, self.master_port, self.world_size, self.timeout)
            else:
                self._store = TCPStore(
                    self.master_addr,
                    self.master_port,
                    self.world_size,
                    False,
                    self.timeout,
                    multi_tenant=True,
                )
        return RendezvousInfo(
            PrefixStore(self.run_id, self._store),
            self.rank,
            self.world_size,
            RendezvousStoreInfo(self.master_addr, self.master_port),
        )


def _resolves_to_loopback(address: str) -> bool:
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except OSError:
        return False  # unresolvable: binding it fails with the resolver's own message
    return any(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """``--rdzv-backend opd-static --rdzv-endpoint ADDR:PORT --rdzv-conf rank=NODE_RANK``: on one node
    (``--nnodes 1``) the store binds (and workers use) loopback, otherwise ADDR."""
    if "rank" not in params.config:
        raise ValueError(f"--rdzv-backend {BACKEND} needs the node's rank: --rdzv-conf rank=NODE_RANK")
    master_addr, master_port = parse_rendezvous_endpoint(params.endpoint.strip(), -1)
    if not master_addr or master_port == -1:
        raise ValueError(f"--rdzv-backend {BACKEND} needs --rdzv-endpoint ADDR:PORT, got {params.endpoint!r}")
    rank = int(cast(str, params.config["rank"]))
    if params.max_nodes == 1:
        master_addr = LOOPBACK
    elif rank == 0 and _resolves_to_loopback(master_addr):
        # e.g. Debian's '127.0.1.1 <hostname>' in /etc/hosts: the store would be unreachable from other nodes.
        raise ValueError(
            f"MASTER_ADDR {master_addr} resolves to a loopback address on this node, so the other nodes could not "
            "reach the rendezvous store bound to it; set MASTER_ADDR to this node's IP address on the cluster network"
        )
    timeout = int(params.config.get("timeout", 900))
    return BoundStaticRendezvous(
        master_addr, master_addr, master_port, rank, params.max_nodes,
        params.run_id, timeout,
    )  # fmt: skip


def loopback_only_env(env: dict[str, str] | os._Environ) -> list[str]:
    """Point gloo and NCCL at the loopback interface (unless the user chose one): a one-node run needs no other.
    Returns the variables it set. Linux only (the interface is named ``lo`` there)."""
    if not sys.platform.startswith("linux"):
        return []
    added = [key for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if key not in env]
    for key in added:
        env[key] = "lo"
    return added


def _nnodes(argv: list[str]) -> str:
    """torchrun's ``--nnodes`` value in ``argv`` (``N`` or ``MIN:MAX``; its default is 1)."""
    for i, arg in enumerate(argv):
        if arg == "--nnodes" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--nnodes="):
            return arg.split("=", 1)[1]
    return "1"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rendezvous_handler_registry.register(BACKEND, create_handler)
    if _nnodes(argv) in ("1", "1:1"):
        loopback_only_env(os.environ)  # inherited by the workers torchrun starts
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv)


if __name__ == "__main__":
    main()
