"""The C part of the package (pyproject.toml holds the rest): the store's per-event loops
(store/_speedups.c) and the engine's per-order snapshot loop and per-input consumer loops
(engine/_speedups.c). Built by `pip install`, which needs a C compiler, Python's headers
and OpenSSL's (the engine's output chain hash: the library behind hashlib): gcc,
python3-dev and libssl-dev on Debian."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror"]
setup(ext_modules=[Extension("store._speedups", ["store/_speedups.c"], extra_compile_args=FLAGS),
                   Extension("engine._speedups", ["engine/_speedups.c"],
                             extra_compile_args=FLAGS, libraries=["crypto"])])
