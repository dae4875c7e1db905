"""The asyncio (uvloop) process that runs nbdkit with the nbdclone plugin and watches it."""
