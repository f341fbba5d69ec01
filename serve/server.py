"""The vLLM deployment: Ray Serve LLM's `LLMServer` with lorafleet's adapter store plugged in as
its LoRA loader (local directories, s3:// and gs://, through `cluster.store.storage`).

Serve's multiplexing keeps at most `max_loras_per_replica` adapters per replica, evicting the
least recently used, and routes a request to a replica that has its adapter loaded when it can.
"""

from __future__ import annotations

import asyncio
import functools

from serve.ray_internal import (
    DiskMultiplexConfig,
    LLMServer,
    LoraModelLoader,
    get_lora_id,
    global_id_manager,
)
from serve.store import base_source, local_copy


class StoreLoraLoader(LoraModelLoader):
    """Resolves `<model>:<adapter>` to a local directory of the adapter (a cached copy when the
    store is remote)."""

    def __init__(self, *, adapter_root: str, **kwargs):
        super().__init__(**kwargs)
        self.adapter_root = adapter_root

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        path = await asyncio.to_thread(local_copy, self.adapter_root, get_lora_id(lora_model_id))
        disk = DiskMultiplexConfig.model_validate(
            {
                "model_id": lora_model_id,
                "max_total_tokens": None,
                "local_path": path,
                "lora_assigned_int_id": global_id_manager.next(),
            }
        )
        self.disk_cache[lora_model_id] = disk
        return disk


class LoraStoreServer(LLMServer):
    async def __init__(
        self,
        llm_config,
        *,
        adapter_root: str,
        warm: list[str] | None = None,
        releases_uri: str | None = None,
    ):
        self._lora_locks: dict[str, asyncio.Lock] = {}
        self._requests_by_lora: dict[str, int] = {}  # what Serve's multiplexing routed here
        loading = llm_config.model_loading_config
        # a base on a bucket: this node's cached copy, fetched before the engine starts
        local = await asyncio.to_thread(base_source, loading.model_source)
        if local != loading.model_source:
            llm_config = llm_config.model_copy(
                update={"model_loading_config": loading.model_copy(update={"model_source": local})}
            )
        await super().__init__(
            llm_config,
            model_downloader=functools.partial(StoreLoraLoader, adapter_root=adapter_root),
        )
        self.adapter_root = adapter_root
        self.warmed = await self.preload(warm or [], releases_uri)

    async def _warm_ids(self, names: list[str], releases_uri: str | None) -> list[str]:
        """`<name>@<version>` to preload: the candidate of each running release first (a ramp
        step raises its share next), then each named adapter's current version."""
        from cluster.store import versions
        from serve.release import running_candidates

        ids = []
        if releases_uri:
            found = await asyncio.to_thread(running_candidates, releases_uri)
            ids += [f"{a}@{v}" for a, v in found.items()]
        for name in names:
            version = await asyncio.to_thread(versions.current, self.adapter_root, name)
            if version is not None:  # not published yet: loaded on its first request
                ids.append(f"{name}@{version}")
        return ids

    async def preload(self, names: list[str], releases_uri: str | None = None) -> list[str]:
        """Load what the app's experiments and releases name (`_warm_ids`), up to the replica's
        LoRA slots, before the replica takes traffic: an autoscaled replica then answers its
        first requests without a cold load. Serve's multiplexing learns what is loaded here,
        and routes those adapters' requests to it."""
        model_id = self._llm_config.model_id
        slots = self._llm_config.lora_config.max_num_adapters_per_replica
        loaded = []
        for lora_id in (await self._warm_ids(names, releases_uri))[:slots]:
            mid = f"{model_id}:{lora_id}"
            try:
                disk = await self._load_model(mid)
                await self.engine.resolve_lora(disk)
                loaded.append(mid)
            except Exception as e:  # a bad adapter fails its own requests, not the replica
                print(f"[serve] could not preload {mid}: {e!r}")
        if loaded:
            print(f"[serve] preloaded {len(loaded)} adapter(s): {', '.join(loaded)}")
        return loaded

    async def record_routing_stats(self) -> dict:
        """Serve's routing-stats hook (the controller polls it; a test or an operator can ask a
        replica actor for it directly): Ray's own stats plus, under "lorafleet", this
        replica's id, what it preloaded, and how many requests Serve routed to it per adapter.
        A replica answers an adapter's request only with the adapter loaded, so these show
        where each adapter is loaded and that the router keeps its requests there."""
        from ray import serve

        stats = dict(await super().record_routing_stats() or {})
        stats["lorafleet"] = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "preloaded": list(self.warmed),
            "requests": dict(self._requests_by_lora),
        }
        return stats

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        # Ray's VLLMEngine.resolve_lora checks "already loaded?" and then awaits the load, so two
        # first requests for one adapter both load it and the second fails ("has already been
        # loaded"). One lock per adapter makes the second wait for the first.
        from ray import serve

        lora = serve.get_multiplexed_model_id()
        if lora:
            self._requests_by_lora[lora] = self._requests_by_lora.get(lora, 0) + 1
        lock = self._lora_locks.setdefault(lora, asyncio.Lock())
        async with lock:
            await super()._maybe_resolve_lora_from_multiplex()
