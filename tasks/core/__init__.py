"""The shared floor under the stages: config, the artifact layout, data I/O, prompts and generation,
model loading and the variant format, scoring, the registry and tracking, plots and process setup.

Stage modules (`tasks/<stage>.py`) import from here and never from each other; nothing here
imports a stage.
"""
