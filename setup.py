"""Build of the native relay extension (everything else is declared in pyproject.toml).

The extension is optional at build time: without a C compiler the package still installs and
the sidecar runs the pure-Python splice pump (``--relay auto`` picks whichever imports).
``PALISADE_RELAY_CFLAGS`` adds compiler flags, e.g. ``-fsanitize=address`` for the CI stress run.
"""

import os
import shlex

from setuptools import Extension, setup

extra = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
extra += shlex.split(os.environ.get("PALISADE_RELAY_CFLAGS", ""))

setup(ext_modules=[Extension("firewall.datapath._relay", ["firewall/datapath/_relay.c"],
                             extra_compile_args=extra, extra_link_args=extra, optional=True)])
