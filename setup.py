"""The C part of the package (pyproject.toml holds the rest): the store's per-event loops
(store/_speedups.c) and the engine's snapshot encoder's per-order loop
(engine/_speedups.c). Built by `pip install`, which needs a C compiler and Python's
headers (gcc and python3-dev on Debian)."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror"]
setup(ext_modules=[Extension("store._speedups", ["store/_speedups.c"], extra_compile_args=FLAGS),
                   Extension("engine._speedups", ["engine/_speedups.c"],
                             extra_compile_args=FLAGS)])
