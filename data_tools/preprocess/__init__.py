"""The parts of ``data_tools/preprocess_data.py``, one job each.

``readers`` finds the input files and reads raw chunks; ``parsers`` decodes and validates
records; ``encoder`` tokenizes chunks in the workers; ``pool`` runs a function over items in
worker processes, results in input order; ``writer`` and ``summary`` write the outputs and say
what was done; ``signals`` turns Ctrl-C / SIGTERM into a clean stop; ``pipeline`` connects them.
"""
