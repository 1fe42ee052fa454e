"""``python -m bench``: the benchmarks that exist so far."""

import sys

print(
    "benchmarks so far:\n"
    "  python -m bench.server_latency frameReady -> publish through the engine server, "
    "512x512 @ 20 fps and 2048x2048 @ 5 fps\n"
    "  python -m bench.model_speed    parameters and CPU time per 256x256 frame, every generator\n"
    "  python -m bench.hook_latency   frameReady -> receiver latency, 256x256 and 2048x2048\n"
    "  python -m bench.sim_noise      simulated camera noise vs the forward model's parameters",
    file=sys.stderr,
)
