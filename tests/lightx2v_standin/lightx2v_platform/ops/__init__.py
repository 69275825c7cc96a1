"""Upstream imports the chip ops for ``$PLATFORM`` here (``cambricon_mlu``, ``ascend_npu``, ...),
which register into the ``PLATFORM_*`` tables. The stand-in has no chip ops; only the templates
in the subpackages, which plugins subclass.
"""
