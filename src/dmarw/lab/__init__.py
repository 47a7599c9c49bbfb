"""The lab: re-run the 2020 vfio_dma_rw thread's measurements on dmarw's own paths.

Modules: :mod:`.workload` (records, profiles, trace files), :mod:`.source` (where a run's
records come from), :mod:`.reference` (the 2020 thread's figures, the only constants),
:mod:`.paths` (one VM's setup and each access path), :mod:`.runner` (VM processes, timing,
lock statistics), :mod:`.measure` (a run's configurations in interleaved rounds),
:mod:`.tables` (the eight tables), :mod:`.stats` (per-round intervals),
:mod:`.verdicts` (one check per claim), :mod:`.render` (terminal layout),
:mod:`.reproduce` (the run, its JSON), :mod:`.plot` (PNG) and :mod:`.cli`
(``dmarw reproduce`` / ``bench`` / ``workload``).
"""
