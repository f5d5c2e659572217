"""Stage `promote`: gates, the MLflow model registry (champion/challenger), the served model.

`python -m tasks.promote` runs the stage (tasks/promote/stage.py); gates.py holds the gate kinds,
candidate.py what is registered of the candidate (its engines, spec and tags, the champion's
rows beside it), bootstrap.py the paired bootstrap vs the champion, registry.py the registered
versions, ledger.py the alias moves (a recorded compare-and-set), pyfunc.py the registered
MLflow pyfunc model, card.py the model card.
"""
