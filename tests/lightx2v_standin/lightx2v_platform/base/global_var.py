"""Process-wide device state, filled in by ``init_ai_device``.

Upstream op modules read these with ``from ... import AI_DEVICE``, so each module keeps the value
it saw when it was first imported.
"""

AI_DEVICE = None
PLATFORM = None
