"""What the notebooks under ``notebooks/`` call: every table, plot and recipe step lives here, not in a cell.

    explore    open a run directory read-only: the dataset, the teacher's spend, training curves, evaluation
    plots      the run view's figures
    authoring  write a recipe of your own, preview the teacher on a few inputs, estimate the cost
"""
