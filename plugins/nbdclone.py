# nbdkit python plugins/nbdclone.py store=PATH     (or let `nbdclone serve` run it)
#
# nbdkit finds the callbacks by name in __main__. The installed package carries the same file
# (nbdclone/worker/nbdkit_plugin.py), which is what `nbdclone serve` runs.
from nbdclone.worker.nbdkit_plugin import *  # noqa: F403
