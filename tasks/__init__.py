"""sftflow's stages (`tasks/<stage>.py`, one per stage, never importing each other) over the shared
core (`tasks.core`), and the command line (`tasks.cli`).

Heavy libraries (torch, transformers, peft, deepspeed, mlflow, gradio, Great Expectations,
matplotlib) are imported inside the functions that use them, on purpose: the CLI, the Prefect flow
and `sftflow --help` import stage modules, and importing those libraries takes seconds. Everything
else is imported at the top of its module.
"""
