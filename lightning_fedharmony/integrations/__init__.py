"""Bridges to other federated engines; each needs its extra (``pip install 'lightning-fedharmony[flower]'``).

:mod:`lightning_fedharmony.integrations.flower` is the only package that imports ``flwr``; importing this package
imports nothing optional.
"""
