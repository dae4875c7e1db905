# A Python nbdkit plugin that does nothing: the ceiling for any Python plugin on this nbdkit.
#   nbdkit python scripts/null_plugin.py size=1G
import nbdkit

API_VERSION = 2
_size = 1 << 30


def config(key, value):
    global _size
    if key != "size":
        raise ValueError(f"unknown parameter {key}")
    _size = nbdkit.parse_size(value)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    pass


def pwrite(h, buf, offset, flags):
    pass


def flush(h, flags):
    pass
