"""Only the optional C extension lives here; everything else is in pyproject.toml.

fastmmio.real._exitpath is the run loop's per-exit path in C (see fastmmio/real/exitpath.py).
``optional=True``: without a C compiler or the Python headers the install still succeeds and
the run loop uses its pure-Python reference loop.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastmmio.real._exitpath",
            ["src/fastmmio/real/_exitpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
