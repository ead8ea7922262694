"""The shared distillation core: data, teachers, students, losses, soft labels, training, evaluation."""

__version__ = "0.1.0"
