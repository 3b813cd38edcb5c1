"""Build hook: the kernel-interface modules are cffi API-mode extensions
compiled against the installed kernel UAPI headers, so struct layouts come
from the headers, never from hand-counted offsets."""

from setuptools import setup

setup(
    cffi_modules=[
        "dmsnap/dm/_build.py:ffibuilder",
        "dmsnap/storage/_loop_build.py:ffibuilder",
        "csrc/build.py:ffibuilder",
        "dmsnap/scsi/_sg_build.py:ffibuilder",
    ],
)
