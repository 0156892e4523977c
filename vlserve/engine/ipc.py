"""Messages between the front process and the engine core process: msgspec over ZeroMQ, tensors out of band.

A message is one msgpack frame plus one raw frame per tensor (an image's pixels are megabytes: they are copied
once into the socket and once out, never pickled). Front -> core: AddRequest, AbortRequest, Shutdown. Core ->
front: Ready (once, after loading) or Failed (start or step failed; the core exits), then one Step per engine step
(and after commands that change its counters).
"""

import msgspec
import torch
import zmq

from vlserve.engine.request import Capacity, CoreOutput, EngineRequest, EngineStats
from vlserve.errors import EngineDeadError

TENSOR_EXT = 1


class AddRequest(msgspec.Struct, tag=True):
    request: EngineRequest


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str
    index: int | None = None  # one sample (a stop string ended it), or the whole request


class Shutdown(msgspec.Struct, tag=True):
    pass


class Ready(msgspec.Struct, tag=True):
    capacity: Capacity
    stats: EngineStats


class Failed(msgspec.Struct, tag=True):
    kind: str  # the exception's class name: the front raises the vlserve error of that name, if there is one
    message: str


class Step(msgspec.Struct, tag=True):
    outputs: list[CoreOutput]
    stats: EngineStats


Command = AddRequest | AbortRequest | Shutdown
CoreMessage = Ready | Failed | Step


class Channel:
    """One direction of messages of type `kind` over a ZeroMQ socket. Not thread-safe: one thread per channel end."""

    def __init__(self, socket: zmq.Socket, kind):
        self.socket = socket
        self.frames: list = []  # tensors of the message being encoded or decoded
        self.encoder = msgspec.msgpack.Encoder(enc_hook=self._encode_tensor)
        self.decoder = msgspec.msgpack.Decoder(kind, ext_hook=self._decode_tensor, dec_hook=_tensor_type)

    def send(self, message) -> None:
        """Queues `message` without blocking (sockets have no high-water mark); raises EngineDeadError when the
        other process is gone (nothing connected to take it)."""
        self.frames = []
        head = self.encoder.encode(message)
        frames, self.frames = [head, *self.frames], []
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise EngineDeadError("the engine core process is gone; restart the server") from None

    def recv(self, timeout_ms: int | None = None):
        """The next message, or None if none came within `timeout_ms` (None: wait as long as it takes)."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        head, *self.frames = self.socket.recv_multipart(copy=False)
        try:
            return self.decoder.decode(head.buffer)
        finally:
            self.frames = []

    def _encode_tensor(self, obj):
        if not isinstance(obj, torch.Tensor):
            raise NotImplementedError(f"cannot send {type(obj).__name__} to the engine core")
        t = obj.detach().cpu().contiguous()
        self.frames.append(t.view(torch.uint8).numpy() if t.numel() else b"")
        header = (str(t.dtype).removeprefix("torch."), list(t.shape), len(self.frames) - 1)
        return msgspec.msgpack.Ext(TENSOR_EXT, msgspec.msgpack.encode(header))

    def _decode_tensor(self, code: int, data: memoryview):
        dtype, shape, index = msgspec.msgpack.decode(data)
        dtype = getattr(torch, dtype)
        raw = bytearray(self.frames[index].buffer)  # one copy, writable: the tensor owns its memory
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).view(shape)


def _tensor_type(kind, obj):
    if kind is torch.Tensor and isinstance(obj, torch.Tensor):
        return obj
    raise NotImplementedError(kind)
