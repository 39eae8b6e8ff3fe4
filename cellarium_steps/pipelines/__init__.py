"""The science of each step as plain functions with keyword arguments: check the options, open the
data, build the recipe (transforms and model), run the passes, write the outputs.

Steps (``cellarium_steps.steps``) parse the command line and call one function here; Python users
call the same functions. Each module imports only the layers below it (data, models, transforms,
runner, outputs) and ``pipelines.features``.
"""
