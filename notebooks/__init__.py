"""Not a library: a package only so that pytest imports ``notebooks/conftest.py`` as
``notebooks.conftest``, which would otherwise shadow ``tests/conftest.py`` (the tests
import helpers from it as ``conftest``)."""
