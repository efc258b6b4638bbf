"""The papers' didactic experiments and the project's studies, built on the core modules; each runs as
`python -m experiments.NAME` from the repository root (docs/STUDY.md has what they measured)."""
