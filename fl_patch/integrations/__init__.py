"""Integrations: one module per library fl_patch patches. Each defines ``TARGETS``, its patch-table rows,
and the factories those rows name. They are imported when the patch table is built, that is after one
of the watched packages (see ``fl_patch._bootstrap``) started importing, never at start-up."""

INTEGRATION_MODULES = (
    "fl_patch.integrations.torch",
    "fl_patch.integrations.transformers",
    "fl_patch.integrations.transformers_loss",
    "fl_patch.integrations.lightx2v",
    "fl_patch.integrations.gems_global",
    "fl_patch.integrations.distributed",
)
