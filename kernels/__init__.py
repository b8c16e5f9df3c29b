"""Compute kernels, installed as ``mhla_stream.kernels``: Triton for CUDA, numba for CPUs."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def pdl_supported() -> bool:
    """Whether the decode kernels launch with programmatic dependent launch here."""
    if not triton_available():
        return False
    from .triton_common import PDL  # imports triton: only when it is importable
    return PDL
