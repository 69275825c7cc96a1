"""A stand-in for FlagCX's torch plugin, for CPU tests: gloo under the name "flagcx".

The real ``import flagcx`` registers its backend with ``Backend.register_backend("flagcx", ...,
devices=("cuda",))``; this one makes the same call for ``("cpu",)`` and hands the work to gloo.
``CREATED`` counts the process groups it made, so a test can tell that FlagCX was really used.
"""

import torch.distributed as dist

CREATED = []


def _create_flagcx_backend(store, rank, world_size, timeout):
    CREATED.append((rank, world_size))
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


dist.Backend.register_backend("flagcx", _create_flagcx_backend, devices=("cpu",))
