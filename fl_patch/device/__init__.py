"""Everything fl_patch knows per device, in one room: which chip this is (:mod:`.devices`), its measured profile
(:mod:`.profiles`), how each call is routed by it (:mod:`.routing`), what a chip nobody measured gets: first-use
verification (:mod:`.verification`) and self-calibration (:mod:`.calibration`), and the two commands that measure a
device in full, ``fl-patch check`` (:mod:`.conformance`) and ``fl-patch tune`` (:mod:`.tuning`), over the kernel
cases they share (:mod:`.kernel_cases`). Nothing here is imported at start-up."""
