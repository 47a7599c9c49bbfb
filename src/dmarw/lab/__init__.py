"""The lab: re-run the seed's measurements on dmarw's own paths (issue 4).

Modules: :mod:`.workload` (records, profiles, trace files), :mod:`.seed` (the seed's numbers,
the only constants), :mod:`.paths` (one VM's setup and each access path), :mod:`.runner`
(VM processes, timing, lock statistics), :mod:`.reproduce` (tables and conclusions),
:mod:`.plot` (PNG) and :mod:`.cli` (``dmarw reproduce`` / ``bench`` / ``workload``).
"""
