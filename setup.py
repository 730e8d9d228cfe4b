"""Package discovery for setuptools; all metadata lives in pyproject.toml.

Three source trees: steer_plugin/ (the runtime, imported as `steer_plugin`), adapters/ (imported as
`steer_adapters`: a bare `adapters` collides with a PyPI distribution) and steer_demo/ (the demo-asset builder,
`steer-build-assets`; the runtime never imports it, tests/test_import_boundary.py). [tool.setuptools.packages.find]
cannot rename a tree, so all are discovered here: every folder with an __init__.py below a root is a package.
tests/test_packaging.py builds the wheel and checks that every file of every tree is in it.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# import name -> folder (relative to this file)
TREES = {"steer_plugin": "steer_plugin", "steer_adapters": "adapters", "steer_demo": "steer_demo"}


def discover() -> list[str]:
    packages = []
    for name, folder in TREES.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=str(HERE / folder))]
    return sorted(packages)


# Non-Python files shipped with a package (tests/test_packaging.py checks that every file is in the wheel).
PACKAGE_DATA = {"steer_plugin.playground": ["*.html"]}

setup(package_dir=TREES, packages=discover(), package_data=PACKAGE_DATA)
