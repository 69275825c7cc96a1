"""What the device-bound routing costs a call on this GPU: fl_patch.device.routing's busy probe (a stream query), timed
with the device idle and with work queued, against a plain Python call. Prints microseconds per call."""

import time

import torch

from fl_patch.device import routing


def per_call_us(function, calls: int = 20000) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    probe = routing._busy_probe("cuda")
    torch.cuda.synchronize()
    idle = per_call_us(lambda: probe(device))
    print(f"idle device: busy={probe(device)}, {idle:.2f} us per probe")
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    for _ in range(400):  # ~80 ms of queued matmuls
        a @ a
    busy = per_call_us(lambda: probe(device), calls=2000)
    print(f"busy device: busy={probe(device)}, {busy:.2f} us per probe")
    torch.cuda.synchronize()
    print(f"plain Python call: {per_call_us(lambda: None):.2f} us")


if __name__ == "__main__":
    main()
