"""Stand-in for SimpleITK on a machine without it (the GPU check; its wheel is 52 MB, too big to carry).

nnU-Net and acvl_utils import SimpleITK at module level in modules the check imports but never calls into
for a dataset read through NibabelIO. Importing works; using any name raises, so a code path that really
needs SimpleITK fails loudly instead of silently. benchmarks/gpu_check.sh puts this folder on PYTHONPATH
only when `import SimpleITK` fails.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"SimpleITK is not installed (benchmarks/simpleitk_stub stands in for it): SimpleITK.{name} "
                      f"was used; read and write NIfTI through NibabelIO instead")
