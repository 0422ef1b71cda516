"""Compliance and openness artefacts (SPEC §9): run manifests and their verification, model and data cards with the
EU AI Act public summary, retrospective opt-out removal from built datasets, and the PII output filter."""
