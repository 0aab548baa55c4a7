"""Build hook: ship `nnunetv2_gfscreen.pth` so nnU-Net finds our trainers with no user set-up.

Everything else lives in setup.cfg. The .pth file runs at interpreter start and appends our
trainer shim folder to `nnUNet_extTrainer` (nnU-Net 2.8's external trainer lookup); a value the
user set is kept. It must sit at the root of site-packages, which setup.cfg cannot express, so
build_py copies it there for wheels and editable installs alike.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "nnunetv2_gfscreen.pth"
# one line: a failing import must never break the interpreter of an environment we are installed in
PTH_LINE = ("import sys; exec('try:\\n import nnunetv2_gfscreen.ext_trainer_env\\nexcept Exception as e:\\n "
            "sys.stderr.write(\"nnunetv2_gfscreen: could not register trainers: %r\\\\n\" % (e,))')\n")


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        # an editable install (PEP 660) ignores build_lib; its wheel root is install_lib
        root = self.get_finalized_command("install").install_lib if getattr(self, "editable_mode", False) \
            else self.build_lib
        self.mkpath(root)
        with open(os.path.join(root, PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": build_py_with_pth})
