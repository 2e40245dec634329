"""Which rank went away: a table of every rank's host and PID, shared at start, to name the peer a
surviving rank lost when a collective fails (gloo's "Connection reset by peer" names neither)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import lightning as L
import torch

_PEER_LOSS = re.compile(r"Connection (reset|closed) by peer|Broken pipe|connection refused|"
                        r"NCCL communicator was aborted|remote process exited|Socket closed", re.IGNORECASE)
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")

# (rank, host, pid) of every rank of the current run, filled once the process group exists
PEERS: list[tuple[int, str, int]] = []


class PeerTable(L.Callback):
    """Gathers (rank, host, pid) of every rank at setup, for `lost_peer_message`."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        PEERS.clear()
        me = (trainer.global_rank, socket.gethostname(), os.getpid())
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            table: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(table, me)
            PEERS.extend(tuple(t) for t in table)
        else:
            PEERS.append(me)


def is_peer_loss(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank's process went away."""
    dist_error = getattr(torch.distributed, "DistBackendError", ())
    return (isinstance(e, dist_error) or isinstance(e, RuntimeError)) and bool(_PEER_LOSS.search(str(e)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child not yet reaped (rank 1 is rank 0's child under Lightning's launcher) is a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lost_peer_message(e: BaseException, rank: int | None = None) -> str:
    """One line naming the rank(s) (host, pid) that went away: ranks on this host are checked by PID;
    elsewhere the peer address of the failed connection is matched to the hosts of the table."""
    host = socket.gethostname()
    me = rank if rank is not None else next((r for r, h, p in PEERS if h == host and p == os.getpid()), None)
    who = f"rank {me}" if me is not None else "this rank"
    gone = [(r, h, p) for r, h, p in PEERS if h == host and p != os.getpid() and not _alive(p)]
    if gone:
        names = ", ".join(f"rank {r} (host {h}, pid {p})" for r, h, p in gone)
        return f"{who} on {host} lost its peers: {names} went away (see that rank's log for why; re-run to resume)"
    address = _PEER_ADDRESS.search(str(e))
    remote = []
    if address:
        for r, h, p in PEERS:
            try:
                if h != host and address.group(1) in socket.gethostbyname_ex(h)[2]:
                    remote.append(f"rank {r} (host {h}, pid {p})")
            except OSError:
                continue
    peer = ", ".join(remote) if remote else (f"the rank at {address.group(0)}" if address else "another rank")
    return f"{who} on {host} lost its peers: {peer} went away (see that rank's log for why; re-run to resume)"
