"""Contracts shared by every part of talkingmachines: configs, presets, wire messages, API schemas.

Nothing here imports the other packages of the project.
"""
