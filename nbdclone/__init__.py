"""nbdclone: copy-on-write clones of a read-only base image, served over NBD."""

__version__ = "0.1.0"
