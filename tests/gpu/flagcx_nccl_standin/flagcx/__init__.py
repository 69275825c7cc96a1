"""A stand-in for FlagCX's torch plugin on NVIDIA GPUs: NCCL under the name "flagcx".

FlagCX is not on the package index and is built from source against the CUDA toolkit and NCCL; the lent GPU
machine has neither the source nor a network. This package makes the call a real ``import flagcx`` makes,
``Backend.register_backend("flagcx", ..., devices=("cuda",))``, and hands the work to NCCL, so that
tests/gpu/distributed_gpu.py can prove fl_patch's side on real GPUs: which backend each call ends up with,
what happens to NCCL-only options, and that collectives on CUDA and CPU tensors both work. ``CREATED`` lists
the process groups it made.
"""

import torch.distributed as dist

CREATED = []


def _create_flagcx_backend(store, rank, world_size, timeout):
    CREATED.append((rank, world_size))
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


dist.Backend.register_backend("flagcx", _create_flagcx_backend, devices=("cuda",))
