"""The registered model's code (MLflow "models from code"): MLflow copies this file into the model
folder and runs it on load, so the model is rebuilt from code and its artifacts (the engine files,
`detector.json`) and never unpickled. The `tasks` package travels with the model (`code_paths`).
"""

import mlflow.models

from tasks.promote.pyfunc import DetectorModel

mlflow.models.set_model(DetectorModel())
