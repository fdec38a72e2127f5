"""Figures and widgets for the notebooks: :mod:`~conceptlab.viz.figures`,
:mod:`~conceptlab.viz.widgets`."""
