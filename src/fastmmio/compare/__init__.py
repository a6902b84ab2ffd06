"""``fastmmio compare``: every route on the simulator under the thread's KVM variants, priced
with a CPU profile, next to this host's KVM; the calibration against published figures
(:mod:`.calibration`) and parameter sweeps (:mod:`.sweep`)."""

from fastmmio.compare.core import (
    DEFAULT_ITERATIONS,
    PIO_REFERENCE,
    SIM_CPL,
    Cell,
    Comparison,
    SimRun,
    Timings,
    sim_options,
)

__all__ = ["DEFAULT_ITERATIONS", "PIO_REFERENCE", "SIM_CPL", "Cell", "Comparison", "SimRun",
           "Timings", "sim_options"]
