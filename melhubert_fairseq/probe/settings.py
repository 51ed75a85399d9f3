"""The probes' names and default head budgets, in a module that imports nothing heavy: the pretraining task's
config and ``melhubert-probe --help`` read them without importing torch."""

PR, SID = "pr", "sid"
TASKS = (PR, SID)
#: Adam steps each probe's head trains for unless told otherwise.
DEFAULT_STEPS = {PR: 600, SID: 200}
#: Adam learning rate of each probe's head unless told otherwise.
DEFAULT_LR = {PR: 1e-2, SID: 5e-3}
