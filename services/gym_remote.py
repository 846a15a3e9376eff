"""`GatewayEngine`: the `genie.envs.WorldEngine` of sessions on a running gateway (gRPC), so `WorldEnv` and
`WorldVectorEnv` can play a world served elsewhere. The public `GatewayClient` API only: one session per sub-env,
raw frames; a vector step sends its sub-envs' steps concurrently, and the gateway batches them across sessions."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import grpc
import numpy as np

from genie_api.v1 import gateway_pb2 as pb
from services.gateway.api.client import GatewayClient, frame_array


class GatewayEngine:
    """Sessions on the gateway at `address` under API token `token`; handles are session ids."""

    def __init__(self, address: str, token: str, timeout_s: float = 30.0, sampling_steps: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="genie-gateway-engine", daemon=True)
        self._thread.start()
        self.sampling_steps = sampling_steps
        self._client = self._run(self._make_client(address, token, timeout_s))
        actions = self._run(self._client.list_actions())
        self.num_actions = len(actions.actions)
        self.frame_shape = (int(actions.height), int(actions.width), int(actions.channels))

    @staticmethod
    async def _make_client(address: str, token: str, timeout_s: float) -> GatewayClient:
        return GatewayClient(address, token, timeout_s)  # its channel belongs to the engine's loop

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def reset(self, prompts: np.ndarray, seeds: Sequence[int]) -> tuple[list[str], np.ndarray]:
        async def open_all():
            return await asyncio.gather(*(self._client.open(frames=p[None], seed=int(s), steps=self.sampling_steps,
                                                            frame_format=pb.FRAME_FORMAT_RAW)
                                          for p, s in zip(prompts, seeds, strict=True)))
        opened = self._run(open_all())
        return [o.session.session_id for o in opened], np.stack([frame_array(o.frame) for o in opened])

    def step(self, handles: Sequence[str], actions: Sequence[int]) -> tuple[list[str], np.ndarray]:
        async def step_all():
            return await asyncio.gather(*(self._client.step(h, int(a), frame_format=pb.FRAME_FORMAT_RAW)
                                          for h, a in zip(handles, actions, strict=True)))
        stepped = self._run(step_all())
        return list(handles), np.stack([frame_array(s.frame) for s in stepped])

    def close(self, handles: Sequence[str]) -> None:
        async def close_all():
            for h in handles:
                try:
                    await self._client.close(h)
                except grpc.aio.AioRpcError as exc:  # already gone (expired): nothing to close
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
        self._run(close_all())

    def shutdown(self) -> None:
        """Closes the channel and stops the engine's event loop thread."""
        self._run(self._client.close_channel())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
