"""Stand-in for ``lightx2v_platform/registry_factory.py``: the chip-side ``PLATFORM_*`` tables.

Chip code (``lightx2v_platform.ops.<chip>``) and out-of-tree platform plugins register here. The
framework tables in ``lightx2v.utils.registry_factory`` copy these once, at their first import.
"""

from collections.abc import MutableMapping


class Register(MutableMapping):
    """A name -> callable table that doubles as a class decorator.

    ``@REG`` registers under the class's ``__name__``; ``@REG("key")`` under ``"key"``;
    ``REG.register(cls, key=None)`` does the same without decorator syntax. ``register`` refuses
    non-callables and existing keys (plain ``Exception``, as upstream); item assignment
    (``REG[key] = cls``) overwrites silently. ``merge`` copies another table's entries in and
    refuses keys already present.
    """

    def __init__(self, *args, **kwargs):
        self._dict = dict(*args, **kwargs)

    def __call__(self, target_or_name):
        if callable(target_or_name):
            return self.register(target_or_name)
        return lambda target: self.register(target, key=target_or_name)

    def register(self, target, key=None):
        if not callable(target):
            raise Exception(f"Error: {target} must be callable!")
        key = target.__name__ if key is None else key
        if key in self._dict:
            raise Exception(f"{key} already exists.")
        self[key] = target
        return target

    def merge(self, other_register):
        for key, value in other_register.items():
            if key in self._dict:
                raise Exception(f"{key} already exists in target register.")
            self[key] = value

    def __setitem__(self, key, value):
        self._dict[key] = value

    def __getitem__(self, key):
        return self._dict[key]

    def __delitem__(self, key):
        del self._dict[key]

    def __iter__(self):
        return iter(self._dict)

    def __len__(self):
        return len(self._dict)

    def __str__(self):
        return str(self._dict)


PLATFORM_DEVICE_REGISTER = Register()
PLATFORM_ATTN_WEIGHT_REGISTER = Register()
PLATFORM_MM_WEIGHT_REGISTER = Register()
PLATFORM_RMS_WEIGHT_REGISTER = Register()
PLATFORM_LAYERNORM_WEIGHT_REGISTER = Register()
PLATFORM_ROPE_REGISTER = Register()
PLATFORM_FUSED_MOE_REGISTER = Register()
