"""Host-to-device copies that never wait for the device: a plain `torch.tensor(data, device="cuda")` or `.to("cuda")`
from pageable memory synchronises the stream, which would make the host wait for the step in flight. Data goes
through pinned memory and a non-blocking copy; PyTorch's pinned allocator keeps the buffer until the copy is done."""

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, without a host sync (a CPU tensor goes through pinned memory)."""
    device = torch.device(device)
    if t.device.type == device.type and device.index in (None, t.device.index):
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def device_tensor(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(data, dtype=dtype) on `device`, without a host sync."""
    return to_device(torch.tensor(data, dtype=dtype), device)


class HostCopy:
    """Device tensors copied to the host in the background; `read` waits for that copy alone (an event), not for
    what the stream ran after it."""

    def __init__(self, *tensors: torch.Tensor):
        if tensors and tensors[0].is_cuda:
            self.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                              for t in tensors)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensors, None

    def read(self) -> tuple[torch.Tensor, ...]:
        if self.event is not None:
            self.event.synchronize()
        return self.host
