"""One worker: an nbdkit process running the nbdclone plugin for the clones of its slots.

plugin.py        nbdkit's callbacks and the errno each error becomes (the only module importing nbdkit)
process.py       what the process does around the callbacks: CPU pins, the per-connection thread state,
                 per-clone counters and their publishing, the stop (drain) the supervisor asks for
nbdkit_plugin.py the file nbdkit loads (`nbdkit python .../nbdkit_plugin.py store=...`)
"""
