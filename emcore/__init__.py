"""emcore: the numerical core of sectionflow (plain torch/numpy, no Prefect).

Start with :mod:`emcore.field`, whose docstring defines the displacement-field convention used by
every other module.
"""
