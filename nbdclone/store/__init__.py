"""The storage core: bases, overlays, clones and the catalog. No nbdkit, typer or asyncio here."""
