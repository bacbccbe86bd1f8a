"""Build hook: ship ``protocol/`` (OpenRPC document, error kinds, examples) inside the package.

Everything else is in pyproject.toml. The files land in ``squibd/protocol/`` of the
wheel, so an installed squibd never reads its source tree (``squibd.protocol_file``).
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithProtocol(build_py):
    """build_py, plus protocol/*.json and protocol/examples/* as package data."""

    def run(self) -> None:
        super().run()
        source = os.path.join(_HERE, "protocol")
        target = os.path.join(self.build_lib, "squibd", "protocol")
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithProtocol})
