"""What the storage core answers about its objects: pools, volumes,
snapshots and snapshot requests as plain JSON-able dicts (the control
protocol's results and ``dmsnap ... --json``). Read only; the caller
holds the control lock.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from dmsnap import errors as E
from dmsnap.dm import DeviceMapper, DmError
from dmsnap.dm import status as st
from dmsnap.dm.udev import LINK_DIR
from dmsnap.journal.journal import Journal
from dmsnap.journal.service import status_json
from dmsnap.rules import MiB
from dmsnap.storage import names
from dmsnap.storage.backend import Backend, journal_mode
from dmsnap.storage.catalog import Catalog, Marker, MarkerState, Pool, Snapshot, Volume
from dmsnap.storage.inband import RequestView
from dmsnap.storage.journals import PoolJournals
from dmsnap.storage.stack import PoolStack
from dmsnap.units import Bytes

Json = dict[str, Any]


def link(pool: str, vol: str, snap: str | None = None) -> str:
    """The path an administrator uses: the udev link, else the dm node."""
    path = os.path.join(LINK_DIR, pool, vol if snap is None else f"{vol}@{snap}")
    if os.path.exists(path):
        return path
    dm_name = names.dm_volume(pool, vol) if snap is None else names.dm_snapshot(pool, vol, snap)
    return f"/dev/mapper/{dm_name}"


class Views:
    def __init__(
        self,
        dm: DeviceMapper,
        catalog: Catalog,
        stack: PoolStack,
        journals: PoolJournals,
        pool_errors: dict[str, str],
    ) -> None:
        self.dm, self.catalog, self.stack, self.journals = dm, catalog, stack, journals
        self.pool_errors = pool_errors

    def snapshot_state(self, s: Snapshot) -> str:
        """ "valid", or why the snapshot cannot be trusted (classic:
        "invalid" once its COW area overflowed; "missing"; "inactive" when
        its pool is not assembled)."""
        try:
            _, backend = self.stack.pool(s.pool)
            return backend.snapshot_state(s)
        except (E.UserError, DmError, OSError):
            return "inactive"

    def check_valid(self, s: Snapshot) -> None:
        """Refuse to show an invalid snapshot's content as if it were one."""
        state = self.snapshot_state(s)
        if state == "invalid":
            raise E.Unavailable(
                f"snapshot {s.pool}/{s.volume}@{s.name} is invalid: its COW area overflowed "
                "and its contents are lost; delete it"
            )
        if state != "valid":
            raise E.Unavailable(f"snapshot {s.pool}/{s.volume}@{s.name} is {state}")

    @staticmethod
    def health(pools: list[Json]) -> list[str]:
        """One line per problem of the pools' views, naming its pool."""
        return [f"pool {p['name']}: {h}" for p in pools for h in p["health"]]

    def status(self) -> Json:
        """Every pool and volume, the snapshots counted, the health lines."""
        pools = [self.pool(p) for p in self.catalog.pools()]
        snaps = self.catalog.snapshots()
        return {
            "pools": pools,
            "volumes": [self.volume(v) for v in self.catalog.volumes()],
            "snapshots": len(snaps),
            "active_snapshots": sum(1 for s in snaps if s.active),
            "pending": len(self.catalog.pending()),
            "health": self.health(pools),
        }

    def pool(self, pool: Pool, detail: bool = False) -> Json:
        embedded = self.stack.embedded_files(pool.name)
        out: Json = {
            "name": pool.name,
            "uuid": pool.uuid,
            "backend": pool.backend,
            "embedded": pool.embedded,
            "data_device": pool.data_dev or embedded[0],
            "cache_device": pool.cache_dev or (embedded[1] if pool.cache_size else None),
            "size": pool.size,
            "volumes": len(self.catalog.volumes(pool.name)),
            "snapshots": len(self.catalog.snapshots(pool.name)),
            "health": [],
            "writecache": None,
        }
        with contextlib.suppress(OSError):
            host = out["host_fs"] = self.stack.host_space(pool)
            if host is not None and host["unallocated"] > host["free"]:
                out["health"].append(
                    f"host file system {host['path']} has {host['free'] // MiB} MiB free, less "
                    f"than the pool's sparse files may still take "
                    f"({host['unallocated'] // MiB} MiB): its writes fail once it fills"
                )
        out["health"] += self.stack.gone(pool)
        if pool.name in self.pool_errors:
            out["health"].append(self.pool_errors[pool.name])
            return out
        try:
            backend: Backend = self.stack.backend(pool)
        except (E.UserError, DmError, OSError) as e:
            out["health"].append(f"not active: {getattr(e, 'message', e)}")
            return out
        usage = backend.usage()
        out["health"] += usage.pop("health", [])
        if not detail:
            usage.pop("snapshots", None)
        out.update({k: v for k, v in usage.items() if k not in ("backend", "size")})
        out["data_size"] = usage.get("size")
        out["journal"] = self._journal(pool, out["health"])
        if pool.cache_dev or pool.cache_size:
            out["writecache"] = self.stack.writecache_json(pool)
            if out["writecache"].get("error"):
                out["health"].append(f"writecache error {out['writecache']['error']}")
        overcommit = sum(v.size for v in self.catalog.volumes(pool.name))
        if backend.thin_provisioned and usage.get("size") and overcommit > usage["size"]:
            out["overcommitted"] = overcommit / usage["size"]
        return out

    def _journal(self, pool: Pool, health: list[str]) -> Json:
        if journal_mode(pool) == "none":
            return {"mode": "none"}
        pj = self.journals.by_pool.get(pool.id)
        jcfg = pool.config["journal"]
        # the setting (NV): what the live window may take in RAM
        memory = jcfg.get("memory") or Journal.MEM_DEFAULT if jcfg["mode"] == "nv" else None
        if pj is None:
            health.append("journal not running")
            return {
                "mode": jcfg["mode"],
                "path": jcfg.get("path"),
                "memory": memory,
                "running": False,
            }
        j = {"path": jcfg.get("path"), "memory": memory, "running": True, **status_json(pj)}
        for key, what in (
            ("journal_error", "journal error"),
            ("flush_error", "journal flush error"),
            ("last_marker_error", "journal last marker error"),
        ):
            if j[key]:
                health.append(f"{what}: {j[key]}")
        if j["flusher_waiting_volume"]:
            health.append(f"journal flusher waits for volume id {j['flusher_waiting_volume']}")
        return j

    def volume(self, vol: Volume) -> Json:
        dm_name = names.dm_volume(vol.pool, vol.name)
        journaled = (
            vol.pool_id in self.journals.by_pool
            or journal_mode(self.catalog.pool_by_id(vol.pool_id)) != "none"
        )
        out: Json = {
            "pool": vol.pool,
            "name": vol.name,
            "size": vol.size,
            # A journaled volume is reached through dmsnapd (its dm device is
            # private): no path until it is exported.
            "path": None if journaled else link(vol.pool, vol.name),
            "journaled": journaled,
            "dm_name": dm_name,
            "snapshots": len(self.catalog.snapshots(vol.pool, vol.name)),
            "created": vol.created,
            "active": False,
        }
        try:
            info = self.dm.info(dm_name)
            out["active"] = True
            out["open_count"] = info.open_count
            s = self.dm.status(dm_name, noflush=True)[0].status
            if isinstance(s, st.ThinStatus):
                out["mapped"] = Bytes.of(s.mapped_sectors)
        except DmError:
            pass
        return out

    def snapshot(self, s: Snapshot) -> Json:
        return {
            "pool": s.pool,
            "volume": s.volume,
            "name": s.name,
            "state": self.snapshot_state(s),
            "cow_size": s.cow_size,
            "group": s.group_id,
            "created": s.created,
            "active": s.active,
            "path": link(s.pool, s.volume, s.name) if s.active else None,
            "labels": s.labels,
        }

    def group(self, gid: int | None) -> Json:
        snaps = [s for s in self.catalog.snapshots() if s.group_id == gid]
        return {
            "group": gid,
            "name": snaps[0].name if snaps else None,
            "state": MarkerState.DONE,
            "snapshots": [self.snapshot(s) for s in snaps],
        }

    def marker(self, mk: Marker) -> Json:
        out: Json = {
            "marker": mk.id,
            "name": mk.name,
            "state": mk.state,
            "token": mk.token,
            "requested": mk.created,
        }
        if mk.state == MarkerState.DONE:
            out.update(self.group(mk.group_id))
        if mk.error:
            out["error"] = mk.error
        return out

    def request(self, p: Pool, *, marker: int | None, token: str | None) -> Json:
        """Where a journaled snapshot request stands (by marker id or token;
        a token of a direct request finds its group)."""
        if (marker is None) == (token is None):
            raise E.InvalidArgument("name either a marker id or a request token")
        mk = self.catalog.marker(marker) if marker is not None else None
        if token is not None:
            mk = self.catalog.marker_by_token(p.id, token)
            if mk is None:
                gid = self.catalog.group_by_token(p.id, token)
                if gid is not None:  # made by a direct (unjournaled) request
                    return {**self.group(gid), "token": token}
        if mk is None or mk.pool_id != p.id:
            raise E.NotFound(f"no snapshot request {marker or token!r} in pool {p.name}")
        return self.marker(mk)

    def request_view(
        self, pool: str, vol: str, token: str | None, visible: dict[int, str]
    ) -> RequestView:
        """The pool's snapshot requests (with ``token``, only the latest
        carrying it) and its snapshots by group, from POOL/VOL's export,
        whose senders may snapshot the ``visible`` volumes."""
        p = self.catalog.pool(pool)
        if token is not None:
            mk = self.catalog.marker_by_token(p.id, token)
            markers = [] if mk is None else [mk]
        else:
            markers = self.catalog.markers(p.id)
        groups: dict[int | None, list[Snapshot]] = {}
        for s in self.catalog.snapshots(pool):
            groups.setdefault(s.group_id, []).append(s)
        return RequestView(self.catalog.volume(pool, vol).id, markers, groups, visible)
