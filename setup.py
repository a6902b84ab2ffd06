"""Only the optional C extensions live here; everything else is in pyproject.toml.

fastmmio.real._exitpath is the run loop's per-exit path in C (see fastmmio/real/exitpath.py);
fastmmio.sim._hooks holds C callbacks for unicorn on the simulator's exit path (see
fastmmio/sim/_hooks.c). ``optional=True``: without a C compiler or the Python headers the
install still succeeds, the run loop uses its pure-Python reference loop and the simulator its
Python callbacks.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastmmio.real._exitpath",
            ["src/fastmmio/real/_exitpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "fastmmio.sim._hooks",
            ["src/fastmmio/sim/_hooks.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
