"""Measuring models: attribute judges, KID/FID, evaluate, edit and transition evaluation, visualisation.

May import the served model (:mod:`facegen.model`), the data and the trainers; nothing else imports it but the CLI.
"""
