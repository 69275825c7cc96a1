"""CPU stand-in for ``flag_gems.fused``: only the submodules fl_patch imports by name."""
