"""Compliance and openness artefacts (docs/recipe.md §9): run manifests and their verification (manifest.py), model and
data cards with the EU AI Act public summary (cards.py), retrospective opt-out removal from built datasets (optout.py),
and the PII output filter for generation (output_filter.py). Import from the submodules: the engine's filter must
not pull in the data pipeline."""
