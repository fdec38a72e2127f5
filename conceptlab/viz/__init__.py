"""Figures and widgets for the notebooks: `conceptlab.viz.figures`, `conceptlab.viz.widgets`."""
