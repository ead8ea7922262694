"""Where registered students find their pyfunc class when MLflow unpickles them (the class says it lives here,
so releases before and after this layout load each other's students), and the names earlier releases exported.

Serving a student is its task's (distill_core.tasks); logging and registering it is distill_core.model_io's.
"""

from distill_core.model_io import LoggedStudent, ServingError, log_student
from distill_core.tasks.classification import TextClassifierModel

__all__ = ["LoggedStudent", "ServingError", "TextClassifierModel", "log_student"]
