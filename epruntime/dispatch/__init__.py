"""Dispatch/combine backends: the contract (:mod:`.base`), the one registry of names and capabilities
(:mod:`.registry`, whose ``make_dispatcher`` builds them) and one module per backend.

This package file imports nothing, so the config layer can read the registry without loading a backend."""
