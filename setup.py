"""Packages for setuptools (the rest of the configuration is in pyproject.toml).

`data/` (the embedded corpora) and `recipes/` stay at the repository root, where a reader of the repository looks for
them, and travel in the wheel as `apertus/corpora` and `apertus/recipes` (apertus.embedded.packaged_dir finds
either). pyproject.toml cannot map a folder outside `src/` into a package found by `packages.find`, hence this file.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "apertus.corpora", "apertus.recipes"],
      package_dir={"": "src", "apertus.corpora": "data", "apertus.recipes": "recipes"})
