"""Where students registered by earlier releases find their pyfunc class when MLflow unpickles them.

Serving a student is its task's (distill_core.tasks); logging and registering it is distill_core.model_io's.
"""

from distill_core.tasks.classification import TextClassifierModel

__all__ = ["TextClassifierModel"]
