"""Thin bridge from pip to CMake (pybind11's cmake_example): everything else is in CMakeLists.txt.

Environment switches, forwarded to CMake:
  ONG_WITH_CUDA=0        build the CPU kernels only, even where nvcc exists
  ONG_CUDA_ARCHS="80;90" SASS architectures (PTX of the last one is added)
  ONG_PTXAS_VERBOSE=0    no ptxas register/spill reports (on by default; pip install -v shows them)
  ONG_WITH_HOST=0        skip ong_kernels._C_host (built against the installed torch when its
                         headers are importable; without it optimizer steps are keyed in Python)
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = ".") -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(Path(source_dir).resolve())


def _on_off(env_name: str, default: bool) -> str:
    value = os.environ.get(env_name)
    if value is None:
        return "ON" if default else "OFF"
    return "OFF" if value.strip().lower() in {"0", "off", "false", "no", ""} else "ON"


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp) / "cmake"  # one CMake tree, one target per module
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DONG_WITH_CUDA={_on_off('ONG_WITH_CUDA', True)}",
            f"-DONG_PTXAS_VERBOSE={_on_off('ONG_PTXAS_VERBOSE', True)}",
            f"-DONG_WITH_HOST={_on_off('ONG_WITH_HOST', True)}",
        ]
        if "ONG_CUDA_ARCHS" in os.environ:
            cmake_args.append(f"-DONG_CUDA_ARCHS={os.environ['ONG_CUDA_ARCHS']}")
        try:
            import ninja  # noqa: F401

            cmake_args.append("-GNinja")
        except ImportError:
            pass
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", ext.source_dir, *cmake_args], cwd=build_dir, check=True, env=env)
        target = ext.name.rsplit(".", 1)[-1]
        subprocess.run(
            ["cmake", "--build", ".", "--target", target, "--verbose"],
            cwd=build_dir,
            check=True,
            env=env,
        )


def _torch_importable() -> bool:
    """CMakeLists.txt builds _C_host under the same condition (torch importable here)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


MODULES = [CMakeExtension("ong_kernels._C")]
if _on_off("ONG_WITH_HOST", True) == "ON" and _torch_importable():
    MODULES.append(CMakeExtension("ong_kernels._C_host"))

setup(ext_modules=MODULES, cmdclass={"build_ext": CMakeBuild})
