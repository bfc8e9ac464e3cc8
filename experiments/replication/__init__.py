"""docs/REPLICATION.md and its figures, from the grids' result files alone
(`python experiments/report.py`, which calls document.write).

    document.py   the document top to bottom: its head, every grid's section, the summary of claims
    tables.py     the tables: each variant's mean ± std over seeds, the best constant, the comparisons
    figures.py    the figures (matplotlib, the analysis extra): averages per seed, MoRE's ranks, t-SNE, PCA
    claims.py     the papers' claims checked on the tables' numbers, and the summary that lists them
    papers.py     what each paper claims, in which table, with the numbers it prints; its protocol
    protocol.py   each claim's protocol line, from its cells' recorded settings (epochs per task too)
    analyses.py   the sections of the analyses' JSON files (experiments/probe.py, embeddings.py)
    names.py      how the document names tasks and the bench's methods

Every section function returns its lines and what it found (claims.Finding); nothing is kept in
module-level state between two documents (protocol.Protocols, made by each document, holds its caches).
"""
