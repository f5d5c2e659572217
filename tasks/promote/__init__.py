"""Stage `promote`: gates, the MLflow model registry (champion/challenger), the served model.

`python -m tasks.promote` runs the stage (tasks/promote/stage.py); gates.py holds the gate kinds,
bootstrap.py the paired bootstrap vs the champion, registry.py versions and alias moves,
pyfunc.py the registered MLflow pyfunc model, card.py the model card.
"""
