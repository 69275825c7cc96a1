"""Containers of weight ops (upstream ``lightx2v/common/modules/weight_module.py``).

A ``WeightModule`` holds ops (``add_module``) and tensor ops (``register_parameter``) as attributes and
forwards ``load``, ``register_diff``, ``register_lora``, ``to_cuda`` and ``to_cpu`` to every one that has the
method; a ``WeightModuleList`` is a list of them. The state-dict, lazy-loading and async-offload methods are
not reproduced.
"""

__all__ = ["WeightModule", "WeightModuleList"]


class WeightModule:
    def __init__(self):
        self._modules = {}
        self._parameters = {}

    def is_empty(self):
        return not self._modules and not self._parameters

    def add_module(self, name, module):
        self._modules[name] = module
        setattr(self, name, module)

    def register_parameter(self, name, param):
        self._parameters[name] = param
        setattr(self, name, param)

    def _children(self):
        return [*self._modules.values(), *self._parameters.values()]

    def load(self, weight_dict):
        for child in self._children():
            if hasattr(child, "load"):
                child.load(weight_dict)

    def register_diff(self, weight_dict):
        for child in self._children():
            if hasattr(child, "register_diff"):
                child.register_diff(weight_dict)

    def register_lora(self, weight_dict, strength):
        for child in self._children():
            if hasattr(child, "register_lora"):
                child.register_lora(weight_dict, strength)

    def to_cuda(self, non_blocking=False):
        for child in self._children():
            if child is not None and hasattr(child, "to_cuda"):
                child.to_cuda(non_blocking=non_blocking)

    def to_cpu(self, non_blocking=False):
        for child in self._children():
            if child is not None and hasattr(child, "to_cpu"):
                child.to_cpu(non_blocking=non_blocking)


class WeightModuleList(WeightModule):
    def __init__(self, modules=None):
        super().__init__()
        self._list = []
        for module in modules or []:
            self.append(module)

    def append(self, module):
        self._modules[str(len(self._list))] = module
        self._list.append(module)

    def __getitem__(self, index):
        return self._list[index]

    def __len__(self):
        return len(self._list)

    def __iter__(self):
        return iter(self._list)
