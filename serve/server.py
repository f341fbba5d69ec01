"""The vLLM deployment: Ray Serve LLM's `LLMServer` with lorafleet's adapter store plugged in as
its LoRA loader (local directories, s3:// and gs://, through `cluster.storage`).

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
from serve.store import local_copy


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
    async def __init__(self, llm_config, *, adapter_root: str):
        self._lora_locks: dict[str, asyncio.Lock] = {}
        await super().__init__(
            llm_config,
            model_downloader=functools.partial(StoreLoraLoader, adapter_root=adapter_root),
        )

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        # Ray's VLLMEngine.resolve_lora checks "already loaded?" and then awaits the load, so two
        # first requests for one adapter both load it and the second fails ("has already been
        # loaded"). One lock per adapter makes the second wait for the first.
        from ray import serve

        lock = self._lora_locks.setdefault(serve.get_multiplexed_model_id(), asyncio.Lock())
        async with lock:
            await super()._maybe_resolve_lora_from_multiplex()
