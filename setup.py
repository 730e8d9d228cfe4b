"""Package discovery for setuptools; all metadata lives in pyproject.toml.

Two source trees: steer_plugin/ (imported as `steer_plugin`) and adapters/ (imported as `steer_adapters`: a bare
`adapters` collides with a PyPI distribution). [tool.setuptools.packages.find] cannot rename a tree, so both are
discovered here: every folder with an __init__.py below either root is a package. tests/test_packaging.py builds
the wheel and checks that every file of both trees is in it.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# import name -> folder (relative to this file)
TREES = {"steer_plugin": "steer_plugin", "steer_adapters": "adapters"}


def discover() -> list[str]:
    packages = []
    for name, folder in TREES.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=str(HERE / folder))]
    return sorted(packages)


# Non-Python files shipped with a package (tests/test_packaging.py checks that every file is in the wheel).
PACKAGE_DATA = {"steer_plugin.playground": ["*.html"]}

setup(package_dir=TREES, packages=discover(), package_data=PACKAGE_DATA)
